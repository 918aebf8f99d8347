"""The analytics participant."""
