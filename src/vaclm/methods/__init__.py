"""Factorisation methods: one file each, registered by name; each declares its own Options."""

from . import svd, svd_llm, asvd, fwsvd, gfwsvd  # noqa: F401  (fill the registry, in the order users see)
from .base import METHODS, Factorization, LayerStats, Method, build_method, method_class, method_options

__all__ = ["METHODS", "Factorization", "LayerStats", "Method", "build_method", "method_class", "method_options"]
