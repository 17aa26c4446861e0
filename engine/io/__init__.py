"""Checkpoints: safetensors weights and configs, and loading any kind of saved model."""
