"""End-to-end tests use the session-wide ``services`` fixture from ``tests/conftest.py``."""
