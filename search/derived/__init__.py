"""Points derived from trials (distilled, compressed, tuned) and the operations that make them."""
