"""One implementation's training step in its own process, timed on command (the speed driver's worker).

    python -m benchmarks.speed_worker '{"impl": "ours" | "hf" | "reformer_pytorch", ...}'

The worker builds the step (ours: `build_train_step`, compiled with the spec's XLA options, over the spec's mesh;
peers: the torch model and optimizer, benchmarks.peers), runs the warm-up steps and prints `SPEED_READY {json}`.
It then reads commands from stdin, one a line:
  run N      run N steps, each timed to completion (block_until_ready), and print `SPEED_TIMES {json}`
  profile N  ours only: profile N steps (reformer_jax.xla.profile) and probe its matmul shapes, print
             `SPEED_PROFILE {json}`
  quit       print `SPEED_DONE {json}` with the process's peak RSS (ru_maxrss: compilation included) and exit
so the driver can alternate rounds between implementations that stay alive. A step whose compile-time peak
exceeds `memory_limit_bytes` is not run: the worker prints `SPEED_SKIP {json}` and exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, Tuple

from reformer_jax.training.runtime_memory import peak_rss_bytes

PREFIX = "SPEED_"


def emit(kind: str, payload: Dict[str, Any]) -> None:
    print(f"{PREFIX}{kind} {json.dumps(payload)}", flush=True)


def parse_line(line: str) -> Tuple[str, Dict[str, Any]]:
    """(kind, payload) of a worker line `SPEED_KIND {json}`; ValueError for any other line."""
    if not line.startswith(PREFIX) or " " not in line:
        raise ValueError(f"not a worker message: {line[:200]!r}")
    kind, payload = line[len(PREFIX):].split(" ", 1)
    return kind, json.loads(payload)


def tokens_for(spec: Dict[str, Any]):
    """The same pseudo-random batch for every implementation: int32 [b, l + 1] in [3, vocab)."""
    import numpy as np

    return np.random.default_rng(0).integers(3, spec["sizes"]["vocab_size"],
                                             size=(spec["batch_size"], spec["seq_len"] + 1), dtype=np.int32)


def build_ours(spec: Dict[str, Any]) -> Tuple[Callable[[], float], Dict[str, Any]]:
    """Compile reformer_jax's training step; (step function, facts: compile_s, compile-time peak, cache hits)."""
    import jax

    from reformer_jax import sharding
    from reformer_jax.model.hf_convert import config_from_fields
    from reformer_jax.training.data import lm_batch
    from reformer_jax.training.step_builder import build_train_step
    from reformer_jax.xla.compilation_cache import CacheHits, enable_compilation_cache
    from reformer_jax.xla.profile import xla_flops

    if spec.get("compilation_cache_dir"):
        enable_compilation_cache(spec["compilation_cache_dir"])
    config = config_from_fields(spec["config"])
    batch_size, seq_len = spec["batch_size"], spec["seq_len"]
    config.check_seq_len(seq_len)
    mesh = None
    if spec.get("mesh"):  # the host is split into its devices here, before jax starts its backends
        if spec.get("host_devices"):
            jax.config.update("jax_num_cpu_devices", int(spec["host_devices"]))
        mesh = sharding.make_mesh(sharding.parse_mesh(spec["mesh"], jax.device_count()))
    with CacheHits() as hits:
        t = time.perf_counter()
        built = build_train_step(config, mesh=mesh, compiler_options=spec.get("compiler_options") or {})
        compiled = built.compile(batch_size, seq_len)
        compile_s = time.perf_counter() - t
        abstract_state, abstract_batch, abstract_key = built.abstract_inputs(batch_size, seq_len)
        init = built.init.lower(abstract_key).compile()
    stats = built.memory_of(compiled, batch_size, seq_len)
    facts = {"compile_s": round(compile_s, 3), "compile_peak_bytes": stats.peak_bytes, "cache_hits": hits.count,
             "param_count": int(sum(x.size for x in jax.tree.leaves(abstract_state.params))),
             "flops": xla_flops(compiled)}
    limit = spec.get("memory_limit_bytes")
    if limit is not None and stats.peak_bytes > limit:
        return None, facts
    batch = jax.device_put(lm_batch(tokens_for(spec)), abstract_batch["inputs"].sharding)
    key = jax.device_put(jax.random.key(1), abstract_key.sharding)
    box = {"state": init(jax.device_put(jax.random.key(0), abstract_key.sharding))}

    def step() -> float:
        box["state"], metrics = compiled(box["state"], batch, key)
        jax.block_until_ready((box["state"], metrics))
        return float(metrics["loss"])

    step.compiled, step.config = compiled, config  # for the profile command
    return step, facts


def build_peer(spec: Dict[str, Any]) -> Tuple[Callable[[], float], Dict[str, Any]]:
    from benchmarks import peers

    t = time.perf_counter()
    step = peers.build(spec["impl"], spec["sizes"], tokens_for(spec), threads=spec.get("torch_threads"))
    import torch

    return step, {"compile_s": None, "setup_s": round(time.perf_counter() - t, 3),
                  "param_count": step.parameter_count(), "torch_threads": torch.get_num_threads(),
                  **peers.peer_versions(spec["impl"])}


def serve(spec: Dict[str, Any], commands=sys.stdin) -> int:
    t0 = time.perf_counter()
    step, facts = (build_ours if spec["impl"] == "ours" else build_peer)(spec)
    if step is None:
        emit("SKIP", {**facts, "reason": f"compile-time peak {facts['compile_peak_bytes'] / 2**30:.2f} GiB exceeds "
                      f"the limit {spec['memory_limit_bytes'] / 2**30:.2f} GiB", "ru_maxrss_bytes": peak_rss_bytes()})
        return 0
    warmup = []
    for _ in range(spec.get("warmup_steps", 1)):
        t = time.perf_counter()
        step()
        warmup.append(round(time.perf_counter() - t, 4))
    emit("READY", {**facts, "warmup_s": warmup, "ready_s": round(time.perf_counter() - t0, 3), "pid": os.getpid()})
    for line in commands:
        words = line.split()
        if words[:1] == ["run"] and len(words) == 2:
            times, loss = [], None
            for _ in range(int(words[1])):
                t = time.perf_counter()
                loss = step()
                times.append(time.perf_counter() - t)
            emit("TIMES", {"step_s": times, "loss": loss})
        elif words[:1] == ["profile"] and len(words) == 2 and hasattr(step, "compiled"):
            from benchmarks import step_profile
            from reformer_jax.xla.profile import profile_step

            summary = profile_step(step, step.compiled.as_text(), int(words[1]))
            summary["probes"] = step_profile.probe_matmuls(step.config, spec["seq_len"], spec["batch_size"],
                                                           spec.get("compiler_options") or None)
            emit("PROFILE", summary)
        elif words == ["quit"]:
            break
        else:
            emit("ERROR", {"message": f"unknown command {line.strip()!r}; expected 'run N', 'profile N' (our step "
                           "only) or 'quit'"})
            return 2
    emit("DONE", {"ru_maxrss_bytes": peak_rss_bytes()})
    return 0


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    return serve(json.loads(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
