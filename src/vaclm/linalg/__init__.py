"""Pure tensor maths: no nn.Module, no transformers."""
