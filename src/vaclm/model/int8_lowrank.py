"""Int8LowRankLinear: a LowRankLinear whose two factors are stored as int8 with per-row scales.

Each factor is symmetric per output channel: row j of W is q[j] * s[j] with q in [-127, 127] and
s[j] = max|W[j]| / 127. Before quantising, each column of `up` is scaled to unit norm and its
norm moved into the matching row of `down` (unit_up_columns: the same product, less rounding).
State dict: `name.down.weight` (int8), `name.down.weight_scale`, `name.up.weight` (int8),
`name.up.weight_scale`, `name.up.bias`; the scales and bias follow the model's float dtype.

Matmuls, by where they run:
- CPU inference with float32 activations, where the CPU has bfloat16 arithmetic (AVX512-BF16 / AMX):
  weight-only int8 with bfloat16 activations. Up to 16 tokens (decode): PyTorch's int8 weight
  kernel `aten._weight_int8pack_mm`, which reads the int8 weight as it is (one byte per element;
  a factor whose input width is not a multiple of 16 gets a zero-padded copy, its buffer becoming a
  view of it). More tokens (prefill): the weight converted to bfloat16 and one bfloat16 GEMM, its
  output scaled in float32.
  Measured in docs/speed.md against the alternatives (float32 dequantising, fbgemm's W8A8
  dynamic-quantisation GEMM, faster still but +12% PPL at keep 0.6 on validation windows: it
  quantises the activations to 7 bits).
- CUDA: torch._int_mm with per-token int8 activations where its shape rules allow.
- Otherwise (training, other dtypes, CPUs without bfloat16): the reference, which converts the int8
  weight to the activations' dtype on the fly and scales the matmul's output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..linalg.balance import unit_up_columns

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


KERNEL_MAX_TOKENS = 16  # above this, one bfloat16 GEMM on the converted weight beats the int8 weight kernel
K_MULTIPLE = 16  # the int8 weight kernel needs the input width in multiples of 16 (it crashes otherwise)


def cpu_kernel_available() -> bool:
    """The int8 weight kernel exists and the CPU computes in bfloat16 natively (emulated bfloat16 is
    slower than float32, so there the reference is faster)."""
    native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return hasattr(torch.ops.aten, "_weight_int8pack_mm") and native_bf16


def bf16_int8_matmul(xb: torch.Tensor, q: torch.Tensor, scale_bf16: torch.Tensor,
                     scale_float: torch.Tensor | None = None) -> torch.Tensor:
    """xb @ (q * scale).T in bfloat16 (float accumulation), xb (M x Kp) bfloat16, q (N x Kp) int8
    with Kp a multiple of 16; the int8 weight kernel for few tokens, a bfloat16 GEMM for many.
    `scale_float`: for many tokens, the scale applied in float32 and a float32 result (one bfloat16
    rounding of the output instead of two; int8 PPL change on validation windows at keep 0.6,
    balanced factors: +0.35% -> +0.19%)."""
    if xb.shape[0] <= KERNEL_MAX_TOKENS:
        return torch.ops.aten._weight_int8pack_mm(xb, q, scale_bf16)
    y = F.linear(xb, q.to(torch.bfloat16))
    return y.float().mul_(scale_float) if scale_float is not None else y.mul_(scale_bf16)


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

    cpu_kernel = True  # False: always the reference on CPU (tests, comparisons)

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._operand = None  # (q padded to K_MULTIPLE columns, bfloat16 scale), built at the first kernel call

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

    def kernel_ok(self, x2d: torch.Tensor) -> bool:
        return (self.cpu_kernel and x2d.device.type == "cpu" and x2d.dtype == torch.float32
                and not (torch.is_grad_enabled() and x2d.requires_grad) and _cpu_kernel())

    def operand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q with its input width padded to a multiple of 16, scale in bfloat16). Padding makes a
        zero-filled copy and turns the `weight` buffer into a view of it: still one byte per weight."""
        if self._operand is None:
            q = self._buffers["weight"]
            pad = -q.shape[1] % K_MULTIPLE
            if pad:
                padded = torch.zeros(q.shape[0], q.shape[1] + pad, dtype=q.dtype, device=q.device)
                padded[:, : q.shape[1]] = q
                self._buffers["weight"] = padded[:, : q.shape[1]]
                q = padded
            self._operand = (q, self.weight_scale.to(torch.bfloat16))
        return self._operand

    def bf16_forward(self, xb: torch.Tensor, out: bool = False) -> torch.Tensor:
        """xb (M x in, bfloat16) -> (M x out), bias not added: bfloat16, or with `out` (the result
        leaves the module) float32 for many tokens, the scale applied in float32."""
        q, scale = self.operand()
        if q.shape[1] != xb.shape[1]:
            xb = F.pad(xb, (0, q.shape[1] - xb.shape[1]))
        return bf16_int8_matmul(xb, q, scale, self.weight_scale if out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.kernel_ok(x2d):
            y = self.bf16_forward(x2d.to(torch.bfloat16), out=True).float()
        elif _int_mm_ok(x2d, self.weight):
            y = int8_matmul(x2d, self.weight, self.weight_scale)
        else:
            # scale the matmul's output rather than the weight, in place: no second weight-sized
            # temporary and no extra output-sized allocation (measured: either costs ~10% at 512 tokens)
            y = F.linear(x2d, self.weight.to(x.dtype)).mul_(self.weight_scale.to(x.dtype))
        if self.bias is not None:
            y = y.add_(self.bias.to(y.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def __setattr__(self, name, value):
        if name in ("weight", "weight_scale"):  # new values: the kernel's copy is stale
            self.__dict__["_operand"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        self._operand = None  # rebuilt from the moved/cast buffers at the next kernel call
        if not self._buffers["weight"].is_contiguous():  # a view of the padded copy: move only the weight
            self._buffers["weight"] = self._buffers["weight"].contiguous()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"].contiguous()  # safetensors wants dense

    def _load_from_state_dict(self, *args, **kwargs):
        self._operand = None  # the scale may change (the padded q is written through its view)
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


_KERNEL: list[bool] = []


def _cpu_kernel() -> bool:
    if not _KERNEL:  # asked once per process
        _KERNEL.append(cpu_kernel_available())
    return _KERNEL[0]


def _plain(module: Int8Linear) -> bool:
    """No hooks and no replaced forward: calling the kernel directly is exactly what its __call__ does."""
    return (type(module) is Int8Linear and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in module.__dict__)


class Int8LowRankLinear(nn.Module):
    """up(down(x)) with int8 factors: down rank x in (no bias), up out x rank (+ the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = Int8Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = Int8Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_lowrank(cls, module) -> "Int8LowRankLinear":
        """Quantise a float LowRankLinear, its factors balanced first (unit_up_columns)."""
        weight = module.down.weight
        new = cls(module.in_features, module.out_features, module.rank, module.up.bias is not None,
                  device=weight.device, dtype=weight.dtype)
        up, down = unit_up_columns(module.up.weight, module.down.weight)
        new.down = Int8Linear.from_float(down, None)
        new.up = Int8Linear.from_float(up, module.up.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down, self.up
        x2d = x.reshape(-1, self.in_features)
        if down.kernel_ok(x2d) and _plain(down) and _plain(up):
            # both products directly, the rank-wide intermediate kept in bfloat16: two submodule
            # calls and two dtype round trips cost more than a one-token matmul
            # (many tokens: the down product scaled in float32 and rounded once to bfloat16, exactly
            # what the two submodules compute)
            z = down.bf16_forward(x2d.to(torch.bfloat16), out=True).to(torch.bfloat16)
            y = up.bf16_forward(z, out=True).float()
            if up.bias is not None:
                y = y.add_(up.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return up(down(x))

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
