"""Moved to ``messaging.provision.principals``; kept only until ``process_manager.demo`` imports
it from there."""

from messaging.provision.principals import DEFAULT_ADMIN_URL, Principals, provision_all

__all__ = ["DEFAULT_ADMIN_URL", "Principals", "provision_all"]
