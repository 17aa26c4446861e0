"""The network: the U-Net, its cost (parameters, FLOPs), its morphisms and its latency model."""
