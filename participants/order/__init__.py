"""The order participant."""
