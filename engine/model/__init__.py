"""The network: one walk of the U-Net's blocks, and what reads it: the model, its cost
(parameters, FLOPs), its morphisms and its latency model."""
