"""A short micro-benchmark of the device the run will use: what the time estimates divide by.

About a second on a CPU: the dense matmul rate in the model's dtype, the float64 matmul rate
(whitening and the weighted matrices) and the float64 SVD rate at a width near the model's. Each
is the best of a few repetitions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Throughput:
    device: str
    matmul_flops: float  # FLOP/s of a large matmul in the model's dtype
    matmul64_flops: float  # FLOP/s of a float64 matmul
    svd_seconds: float  # seconds of svdvals of an n x n float64 matrix ...
    svd_size: int  # ... n

    def svd_time(self, rows: int, cols: int) -> float:
        """Seconds of one float64 SVD of a rows x cols matrix, scaled as max * min^2 from n^3.
        The pipeline's SVDs with vectors (thin, of tall matrices) measured as fast as singular
        values alone within the run (docs/scale.md): one rate serves both."""
        return self.svd_seconds * max(rows, cols) * min(rows, cols) ** 2 / self.svd_size**3

    def to_dict(self) -> dict:
        return asdict(self)


def _best_seconds(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up: allocations, kernel selection, lazy library loading
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure(device: str = "cpu", dtype: torch.dtype = torch.float32, width: int = 576) -> Throughput:
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = 4096 if gpu else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = 2 * n**3 / _best_seconds(lambda: a @ b, device, 3)
    n64 = 2048 if gpu else 512
    a64 = torch.randn(n64, n64, device=device, dtype=torch.float64)
    mm64 = 2 * n64**3 / _best_seconds(lambda: a64 @ a64, device, 3)
    # an SVD's rate depends on the width (blocking, cache): measure near the model's own
    size = int(min(max(width, 256), 1024))
    m = torch.randn(size, size, device=device, dtype=torch.float64)
    svd = _best_seconds(lambda: torch.linalg.svdvals(m), device, 2)
    return Throughput(str(device), mm, mm64, svd, size)
