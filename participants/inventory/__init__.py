"""The inventory participant."""
