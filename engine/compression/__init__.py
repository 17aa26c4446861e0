"""Compression: structured pruning, weight quantisation and reduced precision."""
