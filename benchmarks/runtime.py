"""Runtime memory of a few real training steps of one variant, in its own process.

    python -m benchmarks.runtime '{"config": {...ModelConfig fields...}, "batch_size": 1, "seq_len": 4096,
                                  "optimizer": "adafactor", "steps": 2, "profile_path": null}'

prints one line `RUNTIME_RESULT {json}`. `benchmarks.memory --experiment=runtime` starts one such process per
variant, because a device's peak counter cannot be reset and a process's RSS high-water mark only rises.
GPU / TPU: `memory_stats()["peak_bytes_in_use"]` after the steps (the parent turns preallocation off), and a device
memory profile (pprof) saved with `jax.profiler.save_device_memory_profile`. CPU (memory_stats() is None): the
process's RSS sampled every few milliseconds while the compiled step runs, minus the RSS just before the state was
created; `ru_maxrss` before and after is recorded too (it also holds compilation's high-water mark).
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

from benchmarks.measure import ru_maxrss_bytes

RESULT_PREFIX = "RUNTIME_RESULT "


def summarize_device_stats(stats: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Runtime fields from a device's `memory_stats()` dict (GPU/TPU). Raises ValueError without a peak."""
    if not stats or "peak_bytes_in_use" not in stats:
        raise ValueError(f"memory_stats() gave no 'peak_bytes_in_use' (got {sorted(stats or {})}); this backend "
                         "reports no device peak: use the CPU (RSS) path.")
    return {"runtime_source": "memory_stats.peak_bytes_in_use", "runtime_peak_bytes": int(stats["peak_bytes_in_use"]),
            "device_bytes_in_use": int(stats.get("bytes_in_use", 0)),
            "device_bytes_limit": int(stats.get("bytes_limit", 0))}


class RSSSampler:
    """Max resident set size of this process, sampled in a background thread."""

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


def run_worker(spec: Dict[str, Any], *,
               stats_source: Optional[Callable[[], Optional[Dict[str, Any]]]] = None) -> Dict[str, Any]:
    """Compile the step (`build_train_step`), run `steps` real steps and measure. `stats_source` replaces the
    device's memory_stats (tests pass a fake one to exercise the GPU path on CPU)."""
    import jax
    import numpy as np
    import psutil

    from reformer_jax.model.hf_convert import config_from_fields
    from reformer_jax.training.step_builder import build_train_step

    config = config_from_fields(spec["config"])
    batch_size, seq_len, steps = int(spec["batch_size"]), int(spec["seq_len"]), int(spec.get("steps", 2))
    stats_source = stats_source or (lambda: jax.devices()[0].memory_stats())
    t0 = time.perf_counter()
    built = build_train_step(config, optimizer=spec.get("optimizer") or "adafactor")
    compiled = built.compile(batch_size, seq_len, spec.get("extra_options") or None)
    stats = built.memory_of(compiled, batch_size, seq_len)
    init = built.init.lower(built.abstract_inputs(batch_size, seq_len)[2]).compile()
    compile_s = time.perf_counter() - t0

    tokens = np.random.default_rng(0).integers(3, config.vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
    gc.collect()
    rss_base, ru_before = int(psutil.Process().memory_info().rss), ru_maxrss_bytes()
    step_times, losses = [], []
    with RSSSampler() as sampler:
        state = init(jax.random.key(0))
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch_size, seq_len),
                                                                                        np.float32)}
        batch = jax.device_put(batch)
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch, jax.random.key(1))
            jax.block_until_ready((state, metrics))
            step_times.append(time.perf_counter() - t)
            losses.append(float(metrics["loss"]))
    result: Dict[str, Any] = {**stats.to_dict(), "steps": steps, "compile_s": round(compile_s, 2),
                              "step_s": [round(s, 3) for s in step_times], "losses": losses,
                              "rss_base_bytes": rss_base, "rss_max_bytes": sampler.max_rss,
                              "ru_maxrss_before_bytes": ru_before, "ru_maxrss_after_bytes": ru_maxrss_bytes()}
    result.update(runtime_fields(stats_source, compile_peak_bytes=stats.peak_bytes, rss_base=rss_base,
                                 rss_max=sampler.max_rss, profile_path=spec.get("profile_path")))
    return result


def runtime_fields(stats_source: Callable[[], Optional[Dict[str, Any]]], *, compile_peak_bytes: int, rss_base: int,
                   rss_max: int, profile_path: Optional[str]) -> Dict[str, Any]:
    """The runtime figure after the steps: the device's peak (and a saved device memory profile) where the
    backend reports one, else the sampled RSS above the baseline; with its ratio to the compile-time peak."""
    device_stats = stats_source()
    if device_stats is not None:
        fields = summarize_device_stats(device_stats)
        if profile_path:
            import jax

            jax.profiler.save_device_memory_profile(profile_path)
            fields["device_memory_profile"] = profile_path
    else:
        fields = {"runtime_source": "process RSS (sampled) above the pre-state baseline",
                  "runtime_peak_bytes": rss_max - rss_base}
    fields["runtime_over_compile"] = fields["runtime_peak_bytes"] / max(1, compile_peak_bytes)
    return fields


def parse_result(stdout: str) -> Dict[str, Any]:
    """The worker's result from its stdout (the last RUNTIME_RESULT line)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ValueError("the runtime worker printed no RUNTIME_RESULT line; its output ended with:\n" + stdout[-2000:])


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(RESULT_PREFIX + json.dumps(run_worker(json.loads(argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
