"""Runtime memory of a few real training steps of one variant, in its own process.

    python -m benchmarks.runtime '{"config": {...ModelConfig fields...}, "batch_size": 1, "seq_len": 4096,
                                  "optimizer": "adafactor", "steps": 2, "profile_path": null}'

prints one line `RUNTIME_RESULT {json}`. `benchmarks.memory --experiment=runtime` starts one such process per
variant (a device's peak counter cannot be reset, a process's RSS high-water mark only rises); the figure is
`reformer_jax.training.runtime_memory.runtime_fields` (the parent turns preallocation off), on CPU the RSS above
what it was just before the state was created.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any, Callable, Dict, Optional

from reformer_jax.training.runtime_memory import RSSSampler, peak_rss_bytes, runtime_fields

RESULT_PREFIX = "RUNTIME_RESULT "


def run_worker(spec: Dict[str, Any], *,
               stats_source: Optional[Callable[[], Optional[Dict[str, Any]]]] = None) -> Dict[str, Any]:
    """Compile the step (`build_train_step`), run `steps` real steps and measure. `stats_source` replaces the
    device's memory_stats (tests pass a fake one to exercise the GPU path on CPU)."""
    import jax
    import numpy as np
    import psutil

    from reformer_jax.model.hf_convert import config_from_fields
    from reformer_jax.training.data import lm_batch
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
    rss_base, ru_before = int(psutil.Process().memory_info().rss), peak_rss_bytes()
    step_times, losses = [], []
    with RSSSampler() as sampler:
        state = init(jax.random.key(0))
        batch = jax.device_put(lm_batch(tokens))
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch, jax.random.key(1))
            jax.block_until_ready((state, metrics))
            step_times.append(time.perf_counter() - t)
            losses.append(float(metrics["loss"]))
    result: Dict[str, Any] = {**stats.to_dict(), "steps": steps, "compile_s": round(compile_s, 2),
                              "step_s": [round(s, 3) for s in step_times], "losses": losses,
                              "rss_base_bytes": rss_base, "rss_max_bytes": sampler.max_rss,
                              "ru_maxrss_before_bytes": ru_before, "ru_maxrss_after_bytes": peak_rss_bytes()}
    result.update(runtime_fields(stats_source, compile_peak_bytes=stats.peak_bytes, rss_base=rss_base,
                                 rss_max=sampler.max_rss, profile_path=spec.get("profile_path")))
    return result


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
