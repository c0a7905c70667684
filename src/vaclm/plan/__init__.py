"""Will a compression fit, and how long will it take? Estimates from the model's config alone."""

from __future__ import annotations

import torch

from ..config import CompressConfig
from ..resources import rss_bytes


def make_plan(source: str, config: CompressConfig, device: str = "cpu", dtype: str | torch.dtype = "auto"):
    """The Plan of compressing `source` with `config` on `device` (no weights are read)."""
    from ..io.loading import resolve_dtype
    from .estimate import fitting_change, plan_compression
    from .shapes import model_shape
    from .throughput import measure

    torch_dtype = resolve_dtype(dtype, str(device))
    shape = model_shape(source)
    base = rss_bytes()
    # a GPU that is not here cannot be measured: then memory only, no times
    here = not str(device).startswith("cuda") or torch.cuda.is_available()
    throughput = measure(device, torch_dtype, width=shape.hidden) if here else None
    plan = plan_compression(shape, config, throughput, device, torch_dtype, model=source, base_bytes=base)
    if not plan.fits:
        plan.advice = fitting_change(shape, config, throughput, device, torch_dtype, base)
    return plan
