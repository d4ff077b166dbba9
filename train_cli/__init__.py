"""Command line interface (``fair``): thin wrappers over fair_core."""
