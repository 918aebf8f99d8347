"""The risk participant (fraud screening)."""
