"""Runtime memory of a few real training steps of one variant, in its own process.

    python -m benchmarks.runtime '{"config": {...ModelConfig fields...}, "batch_size": 1, "seq_len": 4096,
                                  "optimizer": "adafactor", "steps": 2, "profile_path": null}'

prints one line `RUNTIME_RESULT {json}`. `benchmarks.memory --experiment=runtime` starts one such process per
variant, because a device's peak counter cannot be reset and a process's RSS high-water mark only rises.

- GPU / TPU: `memory_stats()["peak_bytes_in_use"]` after the steps (the parent turns preallocation off with
  XLA_PYTHON_CLIENT_PREALLOCATE=false), and a device memory profile (pprof, a snapshot of live buffers) saved with
  `jax.profiler.save_device_memory_profile`.
- CPU (memory_stats() is None): the process's resident set size, sampled every few milliseconds while the
  already-compiled step runs, minus the RSS just before the state was created; `ru_maxrss` before and after is
  recorded too (it also holds compilation's high-water mark, so its rise is a lower bound).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

RESULT_PREFIX = "RUNTIME_RESULT "


def summarize_device_stats(stats: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Runtime fields from a device's `memory_stats()` dict (GPU/TPU). Raises ValueError without a peak."""
    if not stats or "peak_bytes_in_use" not in stats:
        raise ValueError(f"memory_stats() gave no 'peak_bytes_in_use' (got {sorted(stats or {})}); this backend "
                         "reports no device peak: use the CPU (RSS) path.")
    return {
        "runtime_source": "memory_stats.peak_bytes_in_use",
        "runtime_peak_bytes": int(stats["peak_bytes_in_use"]),
        "device_bytes_in_use": int(stats.get("bytes_in_use", 0)),
        "device_bytes_limit": int(stats.get("bytes_limit", 0)),
    }


class RSSSampler:
    """Max resident set size of this process, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
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


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def ru_maxrss_bytes() -> int:
    """This process's RSS high-water mark (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)


def run_worker(spec: Dict[str, Any], *,
               stats_source: Optional[Callable[[], Optional[Dict[str, Any]]]] = None) -> Dict[str, Any]:
    """Compile the step, run `steps` real steps and measure. `stats_source` replaces the device's memory_stats
    (tests pass a fake one to exercise the GPU path on CPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from reformer_jax.xla.memory_analysis import stats_from_analysis
    from reformer_jax.model.config import ModelConfig
    from reformer_jax.xla.memory_analysis import compiler_options
    from reformer_jax.training import step as train

    config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    batch_size, seq_len, steps = int(spec["batch_size"]), int(spec["seq_len"]), int(spec.get("steps", 2))
    optimizer = spec.get("optimizer") or "adafactor"
    if stats_source is None:
        stats_source = lambda: jax.devices()[0].memory_stats()  # noqa: E731

    t0 = time.perf_counter()
    config.check_seq_len(seq_len)
    # One optimizer object for the state and the step: the state's pytree structure holds it.
    tx = train.make_optimizer(optimizer)
    init_fn = jax.jit(lambda k: train.create_train_state(k, config, tx))
    key_spec = jax.eval_shape(lambda: jax.random.key(0))
    state_spec = jax.eval_shape(init_fn, key_spec)
    batch_spec = train.batch_spec(batch_size, seq_len)
    backend = jax.default_backend()
    compiled = train.jit_train_step(config).lower(state_spec, batch_spec, key_spec).compile(
        {**compiler_options(backend), **spec.get("extra_options", {})})
    stats = stats_from_analysis(compiled.memory_analysis(), state_spec.params, state_spec.opt_state, batch_spec,
                                backend, d_model=config.d_model)
    init = init_fn.lower(key_spec).compile()
    compile_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
    gc.collect()
    rss_base = current_rss()
    ru_before = ru_maxrss_bytes()
    step_times = []
    losses = []
    with RSSSampler() as sampler:
        state = init(jax.random.key(0))
        batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
                 "weights": jnp.ones((batch_size, seq_len), jnp.float32)}
        key = jax.random.key(1)
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch, key)
            jax.block_until_ready((state, metrics))
            step_times.append(time.perf_counter() - t)
            losses.append(float(metrics["loss"]))
    ru_after = ru_maxrss_bytes()

    result: Dict[str, Any] = {**stats.to_dict(), "steps": steps, "compile_s": round(compile_s, 2),
                              "step_s": [round(s, 3) for s in step_times], "losses": losses,
                              "rss_base_bytes": rss_base, "rss_max_bytes": sampler.max_rss,
                              "ru_maxrss_before_bytes": ru_before, "ru_maxrss_after_bytes": ru_after}
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
    result = run_worker(json.loads(argv[1]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
