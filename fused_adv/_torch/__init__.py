"""The pure-PyTorch backend (always available, any device)."""
