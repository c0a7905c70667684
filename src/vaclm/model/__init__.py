"""The only package that knows transformers' module layout."""
