"""Serving engines other than transformers (vLLM)."""
