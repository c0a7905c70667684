"""Frozen, versioned configuration of a compression run.

`CompressConfig.to_dict()` goes into the saved folder's report, `from_dict()` reads it back;
validation happens on construction so a bad budget fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import VaclmError
from .options import int_list, option, parse_size, unpack_versioned

CONFIG_VERSION = 2  # 1: one MethodOptions for every method, and the options removed since
ORDERS = ("front-to-back", "back-to-front", "middle-out")
FISHER_LABELS = ("data", "model")
REMOVED_IN_V2 = ("dense_targets", "within_block", "resolve")  # measured worse; docs/results.md
REMOVED_SEARCH_OPTIONS = ("search_exponent", "exponents")  # never measured to help
EVOLVE = "evolutionary search (--allocation evolve, experimental)"


SEARCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
STRUCTURES = ("lowrank", "prune", "mixed")


@dataclass(frozen=True)
class SearchOptions:
    """`--allocation evolve`: the evolutionary search that starts from the knapsack solution."""

    generations: int | None = option(None, "stop after N generations", group=EVOLVE)
    time_limit: float | None = option(None, "stop before the next generation would pass SECONDS", group=EVOLVE)
    offspring: int = option(8, "mutants per generation", group=EVOLVE)
    survivors: tuple[int, ...] = option((2, 1), "kept after each selection stage, e.g. 2,1", group=EVOLVE, parse=int_list)
    fitness_tokens: tuple[int, ...] = option((2048, 8192), "tokens each selection stage scores, e.g. 2048,8192",
                                             group=EVOLVE, parse=int_list)
    max_moves: int = option(4, "level switches per mutation: 1..N", cli=False)
    search_order: bool = option(False, "materialise the winner in every block order too; held-out windows choose",
                                group=EVOLVE)
    kl_top_k: int = option(1024, "dense log-probs kept per token for the KL (the rest is one tail outcome)", cli=False)
    # "auto" is bfloat16 for a float32 model where the device computes it fast (CUDA, CPUs with
    # AVX512-BF16/AMX), else the model's dtype; the dense reference and the final choice stay in it
    dtype: str = option("auto", "dtype of the candidates' forward passes (auto: bfloat16 for a float32 model "
                                "where it is fast)", choices=SEARCH_DTYPES, group=EVOLVE, flag="--search-dtype")

    def __post_init__(self):
        object.__setattr__(self, "survivors", tuple(int(v) for v in self.survivors))
        object.__setattr__(self, "fitness_tokens", tuple(int(v) for v in self.fitness_tokens))
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

    keep: float = option(0.8, "fraction of decoder linear parameters kept, in (0, 1]")
    target_bytes: int | None = option(None, "budget as the whole model's weight bytes, e.g. 5GB or 400MiB "
                                            "(instead of --keep)", flag="--target-size", parse=parse_size, metavar="SIZE")
    # the best measured combination on the demo model (docs/results.md)
    method: str = option("gfwsvd", "how each matrix is factorised")  # vaclm.methods.METHODS
    allocation: str = option("knapsack", "how ranks are shared under the budget")  # pipeline ALLOCATIONS
    # prune: remove whole MLP neurons (dense, smaller matrices; GGUF-exportable); mixed: the knapsack
    # chooses per MLP between pruning and low rank (docs/pruning.md)
    structure: str = option("lowrank", "lowrank: factorise matrices; prune: remove MLP neurons (every matrix "
                                       "stays dense, exportable to GGUF); mixed: the knapsack picks per MLP",
                            choices=STRUCTURES)
    order: str = option("front-to-back", "order in which blocks are compressed", choices=ORDERS)
    sequential: bool = option(True, "each block's statistics come from the inputs the compressed prefix produces "
                                    "(--no-sequential: all from the dense model, one-shot)")
    int8: bool = option(False, "store the factors as int8 with per-row scales; --target-size then counts them at "
                               "one byte")
    # docs/elastic.md: every smaller keep is a prefix of every matrix's factors (`vaclm resize`)
    elastic: bool = option(False, "also store what every smaller keep needs: `vaclm resize` or "
                                  "vaclm.load(..., keep=K) then gives any keep down to the smallest ranks")
    calib_samples: int = option(32, "calibration windows")
    calib_seq_len: int = option(512, "tokens per calibration window")
    batch_size: int = option(4, "calibration windows per forward pass")
    seed: int = option(0, "seed of the calibration windows' draw (and of everything random)")
    rank_align: int = option(8, "ranks are multiples of this (tensor-core and SIMD friendly)")
    # not part of the result: it bounds memory (gradient statistics are split into layer groups
    # that fit) and is what `vaclm plan` and the check before compressing compare against
    memory_budget: int | None = option(None, "memory the run may use: host RAM on CPU, GPU memory on CUDA, e.g. "
                                             "12GB (default: this machine's)", parse=parse_size, metavar="SIZE")
    # labels of the backward passes that give the gradient statistics: "data" (the calibration
    # text's next tokens: the empirical Fisher, as FWSVD and VAC use it) or "model" (tokens drawn
    # from the model's own next-token distribution: the true Fisher)
    fisher_labels: str = option("data", "gradient statistics from the text's next tokens (data: empirical Fisher) "
                                        "or from tokens drawn from the model (model: true Fisher)",
                                choices=FISHER_LABELS, group="advanced")
    # > 0 protects later blocks: the Kronecker-Fisher estimates of a one-shot truncation price
    # early blocks too high relative to late ones on the demo model (docs/results.md)
    depth_tilt: float = option(0.0, "knapsack: weight block i's loss estimates by exp(TILT * i / (blocks - 1)) "
                                    "when solving", group="advanced")
    # the chosen method's own options (its Options dataclass); None: its defaults
    options: object = option(None, "options of --method", cli=False)
    search: SearchOptions = option(help="the evolutionary search's options", cli=False, default_factory=SearchOptions)

    def __post_init__(self):
        if not (0.0 < self.keep <= 1.0):
            raise VaclmError(f"keep must be in (0, 1], got {self.keep} (e.g. --keep 0.8 keeps 80% of the parameters)")
        from .methods import method_options  # validates the name too

        object.__setattr__(self, "options", method_options(self.method, self.options))
        if self.structure not in STRUCTURES:
            raise VaclmError(f"unknown structure {self.structure!r}; choose one of {', '.join(STRUCTURES)}")
        if self.structure != "lowrank" and (self.allocation != "knapsack" or not self.sequential or self.elastic):
            raise VaclmError(f"--structure {self.structure} runs with the knapsack and sequential statistics, not "
                             "--elastic; drop --allocation/--no-sequential/--elastic or use --structure lowrank")
        if self.order not in ORDERS:
            raise VaclmError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if not abs(self.depth_tilt) <= 20:
            raise VaclmError(f"depth tilt must be a finite number in [-20, 20], got {self.depth_tilt}")
        if self.fisher_labels not in FISHER_LABELS:
            raise VaclmError(f"unknown Fisher labels {self.fisher_labels!r}; choose one of {', '.join(FISHER_LABELS)}")
        if self.target_bytes is not None and self.target_bytes <= 0:
            raise VaclmError(f"target size must be positive, got {self.target_bytes} bytes")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise VaclmError(f"memory budget must be positive, got {self.memory_budget} bytes")
        if self.elastic and self.allocation != "knapsack":
            raise VaclmError("--elastic orders every matrix's ranks by the knapsack's loss estimates; "
                             "drop --allocation or use --allocation knapsack")
        if self.elastic and self.int8 and self.target_bytes is not None:
            raise VaclmError("--elastic sizes are fractions of parameters; with --int8 give --keep instead of --target-size")
        if self.rank_align < 1:
            raise VaclmError(f"rank alignment must be >= 1, got {self.rank_align}")
        if self.allocation == "evolve" and self.search.generations is None and self.search.time_limit is None:
            raise VaclmError("--allocation evolve needs --generations N, --time-limit SECONDS, or both")
        for name in ("calib_samples", "calib_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise VaclmError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["options"] = dataclasses.asdict(self.options)
        return {"type": "CompressConfig", "version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> "CompressConfig":
        data, version = unpack_versioned(data, "CompressConfig", CONFIG_VERSION)
        options = data.pop("options", None) or {}
        if version < 2:  # one options object for every method; drop what this method never read
            from .methods import method_class

            known = {f.name for f in dataclasses.fields(method_class(data.get("method", cls.method)).Options)}
            options = {k: v for k, v in options.items() if k in known}
            for name in REMOVED_IN_V2:
                data.pop(name, None)
        search = {k: v for k, v in data.pop("search", {}).items() if k not in REMOVED_SEARCH_OPTIONS}
        search = SearchOptions(**search)
        return cls(options=options, search=search, **data)
