"""The one-command GPU check (bench/gpu_check.py): CUDA code paths against the CPU, the default
pipeline on a Llama-3-8B-shaped model, and the speed of a factorised 8B-shaped model."""
