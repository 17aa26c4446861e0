"""Data: the built-in and user datasets, and image grids."""
