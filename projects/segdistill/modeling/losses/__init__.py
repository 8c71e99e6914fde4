"""Training-time losses, one file per family (Self-Regulation, pixel-wise, channel-wise, feature-augmented)."""
