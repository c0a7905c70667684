"""Saving, validating, exporting and the transformers quantizer that loads vaclm folders."""
