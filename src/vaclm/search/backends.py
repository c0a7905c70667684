"""Where offspring are scored: in this process (default), or in parallel on the workers of a Ray cluster.

Ray is an optional extra (`pip install 'vaclm[ray]'`). `workers=N` starts a local cluster of N CPU
workers (one thread each); `workers="ray://host:port"` (or "auto") joins a running cluster and
puts one worker on every GPU, or one per node with all its CPUs when there are no GPUs; vaclm must
be installed on the nodes. Every worker builds the same Evaluator from the one FitnessSpec that is
shipped to the object store once, and genomes are handed out one at a time, results in order.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import VaclmError
from .engine import Genome
from .fitness import Evaluator, FitnessSpec


class InProcess:
    def __init__(self, spec: FitnessSpec, device: str | None = None):
        self.evaluator = Evaluator(spec, device)
        self.workers = 1
        self.dtype = str(self.evaluator.dtype).removeprefix("torch.")  # what "auto" resolved to

    def __call__(self, genomes: list[Genome], stage: int, generation: int) -> list[float]:
        return self.evaluator(genomes, stage, generation)

    def close(self) -> None:
        self.evaluator.close()


class _RayWorker:
    def __init__(self, spec: FitnessSpec, device: str, threads: int):
        torch.set_num_threads(threads)
        self.evaluator = Evaluator(spec, device)

    def score(self, genomes, stage, generation):
        return self.evaluator(genomes, stage, generation)


class RayPool:
    def __init__(self, spec: FitnessSpec, workers: int | str):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError as exc:
            raise VaclmError("--workers needs Ray: pip install 'vaclm[ray]'") from exc
        self.ray, self.started = ray, not ray.is_initialized()
        if isinstance(workers, int):
            if self.started:  # a local cluster that can import this very vaclm
                root = str(Path(__file__).resolve().parents[2])
                path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
            placements = [dict(num_cpus=1, device="cpu", threads=1)] * workers
        else:
            if self.started:
                try:
                    ray.init(address=workers, log_to_driver=False)
                except Exception as exc:
                    raise VaclmError(f"cannot join the Ray cluster at {workers} ({type(exc).__name__}: {exc}); "
                                     "check the address, e.g. ray://head:10001") from exc
            gpus = int(ray.cluster_resources().get("GPU", 0))
            if gpus:
                placements = [dict(num_gpus=1, device="cuda", threads=1)] * gpus
            else:
                placements = [dict(num_cpus=int(n["Resources"].get("CPU", 1)), device="cpu",
                                   threads=int(n["Resources"].get("CPU", 1)))
                              for n in ray.nodes() if n.get("Alive")]
        if not placements:
            raise VaclmError("the Ray cluster has no workers; start some, or leave --workers out")
        remote = ray.remote(_RayWorker)
        spec_ref = ray.put(spec)
        self.actors = []
        for p in placements:
            resources = {k: v for k, v in p.items() if k in ("num_cpus", "num_gpus")}
            self.actors.append(remote.options(**resources).remote(spec_ref, p["device"], p["threads"]))
        self.pool = ActorPool(self.actors)
        self.workers = len(self.actors)

    def __call__(self, genomes: list[Genome], stage: int, generation: int) -> list[float]:
        scores = self.pool.map(lambda actor, g: actor.score.remote([g], stage, generation), genomes)
        return [s[0] for s in scores]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


def make_backend(spec: FitnessSpec, workers: int | str | None = None, device: str | None = None):
    """`workers`: None (this process), a number of local Ray CPU workers, or a Ray cluster address."""
    if workers is None or workers == 0:
        return InProcess(spec, device)
    return RayPool(spec, workers)


def parse_workers(text: str | None) -> int | str | None:
    """--workers N or --workers ray://host:port (also 'auto': the cluster this machine belongs to)."""
    if text is None:
        return None
    if text.isdigit():
        if int(text) < 1:
            raise VaclmError("--workers must be >= 1, or a Ray address like ray://head:10001")
        return int(text)
    if text == "auto" or text.startswith("ray://"):
        return text
    raise VaclmError(f"cannot read --workers {text!r}: give a number of local workers or a Ray address (ray://host:port)")
