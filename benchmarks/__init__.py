"""Benchmarks: ``pytest benchmarks/`` measures memory, speed and error against the reference and peers."""
