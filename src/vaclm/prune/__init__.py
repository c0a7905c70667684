"""Structured pruning: removing whole MLP neurons, so every matrix stays dense (docs/pruning.md)."""
