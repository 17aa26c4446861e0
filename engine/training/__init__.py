"""Training: the compiled update, and distillation to fewer steps (progressive, consistency)."""
