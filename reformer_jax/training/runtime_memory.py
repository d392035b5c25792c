"""The memory a process really uses while it runs (beside XLA's compile-time figures, `reformer_jax.xla`).

    with RSSSampler() as sampler:         # the process's RSS, sampled every 2 ms in a background thread
        ...run steps...
    fields = runtime_fields(jax.devices()[0].memory_stats, compile_peak_bytes=stats.peak_bytes,
                            rss_base=before, rss_max=sampler.max_rss)

A GPU or TPU reports its own peak (`memory_stats()["peak_bytes_in_use"]`, a counter that cannot be reset: one
process per measurement); a CPU reports none (`memory_stats()` is None), so there the figure is the sampled RSS
above a baseline taken before the measured work, coarse (allocator caching, thread stacks and code pages count
too). `peak_rss_bytes` is the process's RSS high-water mark, compilation included.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark so far, compilation included (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)


class RSSSampler:
    """Max resident set size of this process while the `with` block runs, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._process, self._interval, self._stop = psutil.Process(), interval_s, threading.Event()
        self.max_rss = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.max_rss = max(self.max_rss, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.max_rss = max(self.max_rss, self._process.memory_info().rss)


def device_peak_fields(stats: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Runtime fields from a device's `memory_stats()` dict (GPU/TPU). Raises ValueError without a peak."""
    if not stats or "peak_bytes_in_use" not in stats:
        raise ValueError(f"memory_stats() gave no 'peak_bytes_in_use' (got {sorted(stats or {})}); this backend "
                         "reports no device peak: use the CPU (RSS) path.")
    return {"runtime_source": "memory_stats.peak_bytes_in_use", "runtime_peak_bytes": int(stats["peak_bytes_in_use"]),
            "device_bytes_in_use": int(stats.get("bytes_in_use", 0)),
            "device_bytes_limit": int(stats.get("bytes_limit", 0))}


def runtime_fields(stats_source: Callable[[], Optional[Dict[str, Any]]], *, compile_peak_bytes: int, rss_base: int,
                   rss_max: int, profile_path: Optional[str] = None) -> Dict[str, Any]:
    """The runtime figure after the measured work: the device's peak (and, with `profile_path`, a device memory
    profile saved there, pprof) where `stats_source()` gives one, else the sampled RSS above the baseline; with its
    ratio to the compile-time peak."""
    device_stats = stats_source()
    if device_stats is not None:
        fields = device_peak_fields(device_stats)
        if profile_path:
            import jax

            jax.profiler.save_device_memory_profile(profile_path)
            fields["device_memory_profile"] = profile_path
    else:
        fields = {"runtime_source": "process RSS (sampled) above the pre-state baseline",
                  "runtime_peak_bytes": rss_max - rss_base}
    fields["runtime_over_compile"] = fields["runtime_peak_bytes"] / max(1, compile_peak_bytes)
    return fields
