"""Frozen, versioned configuration of a compression run.

`CompressConfig.to_dict()` goes into the saved folder's report, `from_dict()` reads it back;
validation happens on construction so a bad budget fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import VaclmError

CONFIG_VERSION = 1
METHODS = ("svd", "svd-llm", "fwsvd", "asvd", "gfwsvd")
ALLOCATIONS = ("uniform", "knapsack", "evolve")
ORDERS = ("front-to-back", "back-to-front", "middle-out")
FISHER_LABELS = ("data", "model")


@dataclass(frozen=True)
class MethodOptions:
    """Knobs of the factorisation methods; each method reads the ones it needs."""

    # Relative damping added to a Gram/covariance diagonal: G + damping * mean(diag G) * I.
    damping: float = 1e-6
    # gfwsvd: relative damping of the output-gradient covariance B, None = same as `damping`.
    cov_damping: float | None = None
    # gfwsvd: damping of B when the allocator prices ranks, None = same as the factorisation's
    # (the factors are then priced in the metric they were truncated in)
    price_cov_damping: float | None = None
    # fwsvd: scaling s(F) = F**p of the Fisher importances (VAC: p = 1/3 beats 1/2).
    fisher_exponent: float = 1.0 / 3.0
    # fwsvd: "rows+cols" (VAC) or "rows" (FWSVD; collapses on the demo model, see the README).
    fisher_mode: str = "rows+cols"
    # fwsvd/asvd: scales are clamped to [mean/clamp, mean*clamp] so no row or column vanishes.
    scale_clamp: float = 1e3
    # asvd: column scaling by mean|x| ** alpha.
    asvd_alpha: float = 0.5

    def __post_init__(self):
        if not self.damping >= 0:
            raise VaclmError(f"damping must be >= 0, got {self.damping}")
        if self.cov_damping is not None and not self.cov_damping >= 0:
            raise VaclmError(f"covariance damping must be >= 0, got {self.cov_damping}")
        if self.price_cov_damping is not None and not self.price_cov_damping >= 0:
            raise VaclmError(f"pricing covariance damping must be >= 0, got {self.price_cov_damping}")
        if self.fisher_mode not in ("rows", "rows+cols"):
            raise VaclmError(f"fisher mode must be 'rows' or 'rows+cols', got {self.fisher_mode!r}")
        if not self.scale_clamp >= 1:
            raise VaclmError(f"scale clamp must be >= 1, got {self.scale_clamp}")


SEARCH_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class SearchOptions:
    """`--allocation evolve`: the evolutionary search that starts from the knapsack solution."""

    generations: int | None = None  # stop after this many generations ...
    time_limit: float | None = None  # ... or before the next one would pass this many seconds
    offspring: int = 8  # mutants per generation
    survivors: tuple[int, ...] = (2, 1)  # kept after each selection stage
    fitness_tokens: tuple[int, ...] = (2048, 8192)  # tokens each stage scores (rounded up to windows)
    max_moves: int = 4  # level switches per mutation: 1..max_moves
    search_exponent: bool = False  # also search the Fisher exponent (fwsvd)
    exponents: tuple[float, ...] = (0.25, 1.0 / 3.0, 0.5, 0.75, 1.0)
    search_order: bool = False  # materialise the winner in every block order, keep the best
    kl_top_k: int = 1024  # dense log-probs kept per token for the KL (the rest is one tail outcome)
    # candidates' forward passes: "auto" is bfloat16 for a float32 model where the device computes it
    # fast (CUDA, CPUs with AVX512-BF16/AMX), else the model's dtype. The dense reference and the
    # final choice stay in the model's dtype.
    dtype: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "survivors", tuple(int(v) for v in self.survivors))
        object.__setattr__(self, "fitness_tokens", tuple(int(v) for v in self.fitness_tokens))
        object.__setattr__(self, "exponents", tuple(float(v) for v in self.exponents))
        if self.generations is not None and self.generations < 1:
            raise VaclmError(f"generations must be >= 1, got {self.generations}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise VaclmError(f"time limit must be positive, got {self.time_limit}")
        if len(self.survivors) != len(self.fitness_tokens):
            raise VaclmError(f"give one --survivors per --fitness-tokens stage, got {self.survivors} and {self.fitness_tokens}")
        if (self.survivors[-1] != 1 or min(self.survivors) < 1 or list(self.survivors) != sorted(self.survivors, reverse=True)
                or self.survivors[0] > self.offspring):
            raise VaclmError(f"survivors must fall stage by stage to 1 and start at most at --offspring, got {self.survivors}")
        if min(self.fitness_tokens) < 1 or list(self.fitness_tokens) != sorted(self.fitness_tokens):
            raise VaclmError(f"fitness tokens must be positive and grow stage by stage, got {self.fitness_tokens}")
        if self.dtype not in SEARCH_DTYPES:
            raise VaclmError(f"search dtype must be one of {', '.join(SEARCH_DTYPES)}, got {self.dtype!r}")
        if self.offspring < 1 or self.max_moves < 1 or self.kl_top_k < 1:
            raise VaclmError("offspring, max moves and KL top-k must be >= 1")


@dataclass(frozen=True)
class CompressConfig:
    """What to compress, how, and under which budget."""

    keep: float = 0.8  # fraction of decoder linear parameters kept, in (0, 1]
    target_bytes: int | None = None  # alternative budget: bytes of the whole model's weights
    # the best measured combination on the demo model (README, bench/allocation.py)
    method: str = "gfwsvd"
    allocation: str = "knapsack"
    rank_align: int = 8  # ranks are multiples of this (tensor-core and SIMD friendly)
    order: str = "front-to-back"
    sequential: bool = True  # each block sees the inputs the already-compressed prefix produces
    # sequential runs of svd-llm / gfwsvd: fit each matrix W' x (x: the compressed prefix's input)
    # to the dense model's output W x_d rather than to W x (linalg/whitening.py); costs one more
    # forward of each block. Off: on the demo model it fits the calibration outputs better but
    # raised the test PPL at keep 0.8 from 31.6 to 38.6 (README, bench/allocation.py)
    dense_targets: bool = False
    # also sequential inside a block: attention projections first, then the MLP sees their output
    within_block: bool = False
    # knapsack + sequential: re-price each block's ranks from its real inputs and re-solve the
    # knapsack for the budget left when the block is reached (pipeline/allocation.py)
    resolve: bool = False
    # quantise the factors to int8 after compressing; a --target-size budget then counts them
    # at one byte per element plus scales (--keep stays a fraction of parameters)
    int8: bool = False
    calib_samples: int = 32
    calib_seq_len: int = 512
    # labels of the backward passes that give the gradient statistics: "data" (the calibration
    # text's next tokens: the empirical Fisher, as FWSVD and VAC use it) or "model" (tokens drawn
    # from the model's own next-token distribution: the true Fisher, which equals the Gauss-Newton
    # curvature of the loss that the truncation errors are meant to estimate)
    fisher_labels: str = "data"
    # knapsack: block i's loss estimates are weighted by exp(depth_tilt * i / (blocks - 1)) when the
    # ranks are chosen; > 0 protects later blocks. The Kronecker-Fisher estimates of a one-shot
    # truncation price early blocks too high relative to late ones on the demo model (README)
    depth_tilt: float = 0.0
    batch_size: int = 4
    seed: int = 0
    options: MethodOptions = field(default_factory=MethodOptions)
    search: SearchOptions = field(default_factory=SearchOptions)

    def __post_init__(self):
        if not (0.0 < self.keep <= 1.0):
            raise VaclmError(f"keep must be in (0, 1], got {self.keep} (e.g. --keep 0.8 keeps 80% of the parameters)")
        if self.method not in METHODS:
            raise VaclmError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise VaclmError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.order not in ORDERS:
            raise VaclmError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if not abs(self.depth_tilt) <= 20:
            raise VaclmError(f"depth tilt must be a finite number in [-20, 20], got {self.depth_tilt}")
        if self.fisher_labels not in FISHER_LABELS:
            raise VaclmError(f"unknown Fisher labels {self.fisher_labels!r}; choose one of {', '.join(FISHER_LABELS)}")
        if self.target_bytes is not None and self.target_bytes <= 0:
            raise VaclmError(f"target size must be positive, got {self.target_bytes} bytes")
        if self.rank_align < 1:
            raise VaclmError(f"rank alignment must be >= 1, got {self.rank_align}")
        if self.allocation == "evolve" and self.search.generations is None and self.search.time_limit is None:
            raise VaclmError("--allocation evolve needs --generations N, --time-limit SECONDS, or both")
        if self.search.search_exponent and self.method != "fwsvd":
            raise VaclmError(f"--search-exponent needs a method with a Fisher exponent (fwsvd); {self.method} has none")
        for name in ("calib_samples", "calib_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise VaclmError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {"type": "CompressConfig", "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "CompressConfig":
        data = dict(data)
        if data.pop("type", "CompressConfig") != "CompressConfig":
            raise VaclmError("not a CompressConfig dictionary")
        version = data.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise VaclmError(f"config version {version} is newer than this vaclm ({CONFIG_VERSION}); upgrade vaclm")
        options = MethodOptions(**data.pop("options", {}))
        search = SearchOptions(**data.pop("search", {}))
        return cls(options=options, search=search, **data)
