"""Diagnostics for any PyTorch model (placeholder while building)."""
