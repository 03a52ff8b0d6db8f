"""minisd's benchmarks against diffusers: `make bench` (see bench/run.py)."""
