"""Saga participants: each owns one PostgreSQL schema and makes every effect idempotent."""
