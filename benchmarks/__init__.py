"""Benchmarks of cuda-toggle-all: its own overhead, and its parallel protocol against the seed's (see README.md)."""
