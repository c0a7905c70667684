"""Calibration and evaluation text."""
