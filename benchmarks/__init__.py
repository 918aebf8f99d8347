"""Benchmarks that sit beside sagabus (not part of the installed package)."""
