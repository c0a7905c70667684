"""Int8LowRankLinear: a LowRankLinear whose two factors are stored as int8 with per-row scales.

Each factor is symmetric per output channel: row j of W is q[j] * s[j] with q in [-127, 127] and
s[j] = max|W[j]| / 127. State dict: `name.down.weight` (int8), `name.down.weight_scale`,
`name.up.weight` (int8), `name.up.weight_scale`, `name.up.bias`; the scales and bias follow the
model's float dtype. On CPU the int8 weight is converted on the fly (nothing cached, so memory
stays at one byte per element) and the scale is applied to the matmul's output; on CUDA,
inference uses torch._int_mm with per-token int8 activations where its shape rules allow.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QMAX = 127  # symmetric: -128 is never used, so negation is exact


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, scale) with weight[j] ~= q[j] * scale[j]; round to nearest, all-zero rows get scale 0."""
    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().float()
    # quantise against the scale as it will be stored, so that dequantising reproduces the rounding
    scale = (w.abs().amax(dim=1) / QMAX).to(scale_dtype)
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    q = torch.round(w / divisor[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or scale.dtype
    return q.to(dtype) * scale.to(dtype)[:, None]


def _int_mm_ok(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """The int8 matmul on CUDA only: on CPU, torch._int_mm is many times slower than dequantising."""
    return x2d.is_cuda and _int_mm_shapes_ok(x2d, weight)


def _int_mm_shapes_ok(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._int_mm (cuBLAS) needs M > 16 and K, N multiples of 8; no gradient flows through it."""
    return (hasattr(torch, "_int_mm") and not (torch.is_grad_enabled() and x2d.requires_grad)
            and x2d.shape[0] > 16 and x2d.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0)


def int8_matmul(x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2d @ (weight * scale).T with x2d quantised per row (token) to int8; int32 accumulation."""
    x = x2d.float()
    x_scale = (x.abs().amax(dim=1, keepdim=True) / QMAX).clamp_(min=1e-12)
    qx = torch.round(x / x_scale).clamp_(-QMAX, QMAX).to(torch.int8)
    # a contiguous K x N operand: transposed views gave silently wrong cuBLAS results in some
    # torch releases (torchao's safe_int_mm makes the same copy); one byte per weight element
    acc = torch._int_mm(qx, weight.t().contiguous())
    return (acc.float() * x_scale * scale.float()).to(x2d.dtype)


class Int8Linear(nn.Module):
    """y = x @ (q * s).T + b with q int8 (out x in) and s (out,) kept as buffers, b an ordinary parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        out_f, in_f = weight.shape
        new = cls(in_f, out_f, bias is not None, device=weight.device, dtype=weight.dtype)
        q, scale = quantize_rows(weight)
        new.weight.copy_(q)
        new.weight_scale.copy_(scale)
        if bias is not None:
            new.bias.data.copy_(bias.detach())
        return new

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if _int_mm_ok(x2d, self.weight):
            y = int8_matmul(x2d, self.weight, self.weight_scale)
        else:
            # scale the matmul's output rather than the weight, in place: no second weight-sized
            # temporary and no extra output-sized allocation (measured: either costs ~10% at 512 tokens)
            y = F.linear(x2d, self.weight.to(x.dtype)).mul_(self.weight_scale.to(x.dtype))
        if self.bias is not None:
            y = y.add_(self.bias.to(y.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8LowRankLinear(nn.Module):
    """up(down(x)) with int8 factors: down rank x in (no bias), up out x rank (+ the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = Int8Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = Int8Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_lowrank(cls, module) -> "Int8LowRankLinear":
        """Quantise a float LowRankLinear."""
        weight = module.down.weight
        new = cls(module.in_features, module.out_features, module.rank, module.up.bias is not None,
                  device=weight.device, dtype=weight.dtype)
        new.down = Int8Linear.from_float(module.down.weight, None)
        new.up = Int8Linear.from_float(module.up.weight, module.up.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        return self.up.dequantized() @ self.down.dequantized()

    @property
    def weight(self) -> torch.Tensor:
        """The int8 `down` factor: modelling code that reads `proj.weight` (GPT-2's init, device
        checks) finds a real, already-loaded tensor, as with LowRankLinear."""
        return self.down.weight

    def factor_bytes(self) -> int:
        """Bytes of the stored factors: int8 elements plus their scales (the bias is not a factor)."""
        return sum(t.numel() * t.element_size() for f in (self.down, self.up) for t in (f.weight, f.weight_scale))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, int8"
