"""Perplexity and other measurements of a model."""
