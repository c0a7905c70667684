"""Factorisation methods: one file each, registered by name (see base.build_method)."""

from .base import Factorization, LayerStats, Method, build_method

__all__ = ["Factorization", "LayerStats", "Method", "build_method"]
