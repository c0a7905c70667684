"""What a run costs: wall seconds and peak host and device memory of each named stage.

Host memory is the process's resident set (Linux /proc); its high-water mark is reset at the
start of each stage, so every stage reports its own peak. Device memory is CUDA's allocator peak.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch


def rss_bytes(field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes; 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    try:  # Linux: writing 5 resets the resident-set high-water mark of this process
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def total_host_bytes() -> int:
    """Physical memory of this machine (or of its cgroup limit, when lower)."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or 1 << 62):
            total = int(text)
    return total


class StageLog:
    """`with log.stage("gradient statistics"): ...` records seconds and peaks of that stage."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.stages: dict[str, dict] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        cuda = self.device.type == "cuda"
        reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            entry = self.stages.setdefault(name, {"seconds": 0.0, "peak_host_bytes": 0, "peak_device_bytes": 0})
            entry["seconds"] += time.perf_counter() - start
            entry["peak_host_bytes"] = max(entry["peak_host_bytes"], rss_bytes("VmHWM"))
            if cuda:
                entry["peak_device_bytes"] = max(entry["peak_device_bytes"], torch.cuda.max_memory_allocated(self.device))

    def to_dict(self) -> dict:
        return {name: {"seconds": round(s["seconds"], 2), "peak_host_bytes": s["peak_host_bytes"],
                       "peak_device_bytes": s["peak_device_bytes"]} for name, s in self.stages.items()}
