"""The shipping participant."""
