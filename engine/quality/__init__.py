"""Quality: the feature network and the FID/KID/precision-recall metrics on its features."""
