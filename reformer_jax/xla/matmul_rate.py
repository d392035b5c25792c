"""The dense matrix product rate this machine attains, measured at given shapes: the roofline of a step's FLOP/s.

    probes = probe_matmuls([(4096, 256, 1024), (4096, 1024, 256)], dtype="float32",
                           option_sets={"step": step_compiler_options(), "xla": {}})
    attainable_rate(probes)   # FLOP/s: the best of the probes

Each [m, k] x [k, n] product is compiled on its own for the default device, with each set of XLA options given,
run once untimed, then `calls` times, each to completion; its rate is 2 m k n over the median call. The best rate
over shapes and option sets is what a step whose FLOPs are matmuls could reach on this machine (XLA spreads one
dense product over the host's cores). Nothing here knows the model: `reformer_jax.model.flops` gives a step's
shapes and FLOPs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp


def probe_matmuls(shapes: Sequence[Tuple[int, int, int]], dtype: Any = "float32",
                  option_sets: Optional[Mapping[str, Dict[str, Any]]] = None, calls: int = 10) -> List[Dict[str, Any]]:
    """One row per (shape, option set): {"m", "k", "n", "dtype", "options", "s_per_call", "flops_per_s"}.

    shapes: (m, k, n) of [m, k] x [k, n] products; option_sets: {name: compiler options} (default {"xla": {}},
    XLA's own); calls: timed calls per product (the median counts)."""
    if calls < 1:
        raise ValueError(f"probe_matmuls: calls={calls} is invalid: expected at least 1.")
    option_sets = {"xla": {}} if option_sets is None else option_sets
    rows = []
    for m, k, n in dict.fromkeys(tuple(s) for s in shapes):  # each distinct shape once, in order
        a_key, b_key = jax.random.split(jax.random.key(0))
        a = jax.random.normal(a_key, (m, k), jnp.float32).astype(dtype)
        b = jax.random.normal(b_key, (k, n), jnp.float32).astype(dtype)
        for name, options in option_sets.items():
            product = jax.jit(jnp.matmul).lower(a, b).compile(dict(options) or None)
            jax.block_until_ready(product(a, b))
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                jax.block_until_ready(product(a, b))
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            rows.append({"m": m, "k": k, "n": n, "dtype": jnp.dtype(dtype).name, "options": name,
                         "s_per_call": median, "flops_per_s": 2 * m * k * n / median})
    return rows


def attainable_rate(probes: Sequence[Dict[str, Any]]) -> Optional[float]:
    """The best FLOP/s of `probe_matmuls`' rows (None for none)."""
    return max((p["flops_per_s"] for p in probes), default=None)
