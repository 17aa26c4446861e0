"""Sampling: noise schedules, the diffusion maths, samplers, timestep tuning and step budgets."""
