"""Prefect flows that only wire stages, and the `gristmill` command line."""
