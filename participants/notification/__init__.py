"""The notification participant."""
