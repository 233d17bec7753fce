"""The benchmark: see bench/README.md."""
