"""Benchmarks: the defence × attack comparison runner (``python -m benchmarks.compare``) and its grids."""
