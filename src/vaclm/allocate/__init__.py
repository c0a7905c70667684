"""Rank allocation across all matrices under one global budget."""
