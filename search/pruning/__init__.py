"""Pruning across objectives: the pruner protocol and constraints, MO-ASHA, the registry."""
