"""The payment participant."""
