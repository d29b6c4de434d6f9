"""Adapters for data-processing frameworks (optional dependencies, imported on use)."""
