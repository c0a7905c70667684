"""Healing a compressed model: knowledge distillation from a teacher into the low-rank factors."""
