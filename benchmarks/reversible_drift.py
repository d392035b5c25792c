"""Reversible reconstruction error: how far the backward pass's recomputed inputs drift from the true ones.

    python -m benchmarks.reversible_drift                          # writes benchmarks/results/reversible_drift.*
    python -m benchmarks.reversible_drift --d_model=64 --seq_len=128 --depths=2,48 --out_dir=/tmp/drift

The backward pass of the reversible stack never stores a layer's inputs: it recomputes them from the outputs,
x2 = y2 - G(y1), x1 = y1 - F(x2), last layer first, with the forward pass's bucket ids. Each subtraction rounds,
and the rounding error of x2 passes through F into x1, so the error can grow with depth. For each depth n this
runs the first n layers of one (n_max)-layer Reformer forward on the embedded tokens, inverts them from their
true outputs with the stack's own backward steps (`reformer_jax.reversible`'s chunked feed-forward step and the
model's fused per-head attention step, given zero cotangents), and reports the relative error of the recovered
stack inputs,
||x_rec - x||_F / ||x||_F (the larger of the two streams), for each compute dtype. Residual streams are float32
in both dtypes; "bfloat16" is the dtype of the blocks' matmuls (ModelConfig.dtype). Parameters are the model's
initialisation (not trained weights), dropout off.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from benchmarks import output
from benchmarks.measure import machine
from reformer_jax import ModelConfig
from reformer_jax.model import ReformerLM, block_functions, init_params
from reformer_jax.reversible import _chunk_count, _feed_forward_backward, _residual_feed_forward

DTYPES = ("float32", "bfloat16")
NAME = "reversible_drift"
FLOAT32_TARGET = 1e-4  # the bound on the float32 relative error at 48 layers


def drift_config(dtype: str = "float32", **sizes: Any) -> ModelConfig:
    """The Reformer preset at these sizes, deterministic (dropout 0), `dtype` compute."""
    return ModelConfig.preset("reformer", dropout=0.0, attention_dropout=0.0, dtype=dtype, **sizes)


def _blocks(config: ModelConfig):
    """F, G and F's fused backward step as `reformer_jax.model.LayerStack` hands them to the reversible stack."""
    return block_functions(config, config.layer_types[0], deterministic=True)


def _layer_forward(config: ModelConfig, p, key, x1, x2):
    """One reversible layer as the stack runs it: (y1, y2, bucket ids)."""
    attention_fn, feed_forward_fn, _ = _blocks(config)
    f, buckets = attention_fn(p["attention"], x2, key, None)
    y1 = x1 + f
    n_chunks = _chunk_count(x1.shape[1], config.ff_chunk_len)
    return y1, _residual_feed_forward(feed_forward_fn, p["feed_forward"], y1, x2, key, n_chunks, 1.0), buckets


def _layer_inverse(config: ModelConfig, p, key, buckets, y1, y2):
    """The layer's inputs (x1, x2) recovered from its outputs by the stack's backward step (zero cotangents)."""
    attention_fn, feed_forward_fn, attention_reverse_fn = _blocks(config)
    zeros = jnp.zeros_like(y1)
    n_chunks = _chunk_count(y1.shape[1], config.ff_chunk_len)
    x2, _, _ = _feed_forward_backward(feed_forward_fn, p["feed_forward"], y1, y2, zeros, zeros, key, n_chunks)
    if config.sequential_heads:
        x1, _, _ = attention_reverse_fn(p["attention"], x2, y1, zeros, zeros, key, buckets)
    else:
        x1 = y1 - attention_fn(p["attention"], x2, key, buckets)[0]
    return x1, x2


def stack_inputs(config: ModelConfig, params: Any, tokens: jax.Array) -> jax.Array:
    """The embedded tokens the model feeds its layer stack: token embedding + positions. [b, l] -> [b, l, d]."""
    positions = ReformerLM(config).apply({"params": params}, tokens.shape[1],
                                         method=lambda model, length: model.positions(length))
    return jnp.take(params["embed"], tokens, axis=0).astype(jnp.float32) + positions.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config: ModelConfig, params, keys, x):
    """All layers forward: (inputs of every layer and the final output [n + 1, 2, b, l, d], buckets [n, ...])."""

    def layer(carry, inputs):
        x1, x2 = carry
        p, key = inputs
        y1, y2, buckets = _layer_forward(config, p, key, x1, x2)
        return (y1, y2), (jnp.stack([x1, x2]), buckets)

    (y1, y2), (inputs, buckets) = lax.scan(layer, (x, x), (params, keys))
    return jnp.concatenate([inputs, jnp.stack([y1, y2])[None]]), buckets


@functools.partial(jax.jit, static_argnums=0)
def _invert(config: ModelConfig, params, keys, buckets, y, depth):
    """Layers depth-1 .. 0 inverted from their true output y [2, b, l, d]: the recovered stack inputs [2, b, l, d]."""

    def body(i, ys):
        index = depth - 1 - i
        p, key, b = jax.tree.map(lambda leaf: lax.dynamic_index_in_dim(leaf, index, keepdims=False),
                                 (params, keys, buckets))
        return jnp.stack(_layer_inverse(config, p, key, b, ys[0], ys[1]))

    return lax.fori_loop(0, depth, body, y)


def _relative_error(recovered: np.ndarray, true: np.ndarray) -> float:
    """max over the two streams of ||recovered - true||_F / ||true||_F, in float64."""
    recovered, true = np.asarray(recovered, np.float64), np.asarray(true, np.float64)
    return max(float(np.linalg.norm(r - t) / np.linalg.norm(t)) for r, t in zip(recovered, true))


def measure_drift(config: ModelConfig, depths: Sequence[int], *, batch_size: int, seq_len: int,
                  seed: int = 0) -> List[Dict[str, Any]]:
    """One row per depth n: relative error of the stack inputs recovered by inverting the first n layers.

    `config.n_layers` must be at least max(depths); shallower depths use the model's first layers.
    """
    if max(depths) > config.n_layers or min(depths) < 1:
        raise ValueError(f"depths {tuple(depths)} must lie in [1, n_layers={config.n_layers}].")
    params = init_params(config, jax.random.key(seed))
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch_size, seq_len), 3, config.vocab_size)
    keys = jax.random.split(jax.random.key(seed + 2), (config.n_layers, 2))
    x = stack_inputs(config, params, tokens)
    activations, buckets = _forward(config, params["layers"], keys, x)
    true_inputs = np.asarray(activations[0])
    rows = []
    for depth in depths:
        recovered = _invert(config, params["layers"], keys, buckets, activations[depth], depth)
        rows.append({"dtype": config.dtype, "n_layers": int(depth),
                     "relative_error": _relative_error(np.asarray(recovered), true_inputs),
                     "max_abs_error": float(np.max(np.abs(np.asarray(recovered, np.float64) - true_inputs))),
                     "input_rms": float(np.sqrt(np.mean(true_inputs.astype(np.float64) ** 2)))})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The command-line driver

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_list("depths", "2,4,8,12,16,24,32,48", "Numbers of layers inverted (the model has the largest).",
                      flag_values=fv)
    flags.DEFINE_list("dtypes", ",".join(DTYPES), "Compute dtypes measured (float32, bfloat16).", flag_values=fv)
    for name, default, help_ in [("d_model", 512, "Model width (the seed's)."), ("n_heads", 8, "Attention heads."),
                                 ("d_ff", 2048, "Feed-forward width."),
                                 ("seq_len", 1024, "Sequence length (a multiple of --chunk_len)."),
                                 ("chunk_len", 64, "LSH chunk length."), ("n_hashes", 4, "LSH hash rounds."),
                                 ("batch_size", 1, "Sequences."), ("seed", 0, "Seed of parameters, tokens, hashes.")]:
        flags.DEFINE_integer(name, default, help_, flag_values=fv)
    flags.DEFINE_string("out_dir", "benchmarks/results", "Where reversible_drift.json / .md are written.",
                        flag_values=fv)


class FlagError(ValueError):
    """A bad flag value, found before anything is compiled."""


def settings_from_flags(fv: flags.FlagValues) -> Dict[str, Any]:
    """Validated settings: {depths, dtypes, sizes}; FlagError naming the flag and what would work."""
    depths = []
    for value in fv.depths:
        try:
            depths.append(int(value))
        except ValueError:
            raise FlagError(f"--depths={','.join(fv.depths)}: {value!r} is not an integer; e.g. --depths=2,8,48.") \
                from None
    if not depths or min(depths) < 1:
        raise FlagError(f"--depths={','.join(fv.depths)} is invalid: expected positive integers, e.g. 2,8,48.")
    dtypes = [d.strip() for d in fv.dtypes]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise FlagError(f"--dtypes={','.join(fv.dtypes)} is invalid: expected a subset of {','.join(DTYPES)}.")
    for name in ("d_model", "n_heads", "d_ff", "seq_len", "chunk_len", "n_hashes", "batch_size"):
        if fv[name].value < 1:
            raise FlagError(f"--{name}={fv[name].value} is invalid: expected a positive integer.")
    if fv.d_model % fv.n_heads:
        raise FlagError(f"--d_model={fv.d_model} is not divisible by --n_heads={fv.n_heads}.")
    if fv.seed < 0:
        raise FlagError(f"--seed={fv.seed} is invalid: expected an integer >= 0.")
    sizes = dict(d_model=fv.d_model, n_heads=fv.n_heads, d_ff=fv.d_ff, n_layers=max(depths), max_len=fv.seq_len,
                 chunk_len=fv.chunk_len, n_hashes=fv.n_hashes)
    try:
        for dtype in dtypes:
            drift_config(dtype, **sizes).check_seq_len(fv.seq_len)
    except ValueError as error:
        message = str(error).replace("ModelConfig.", "--").replace("--max_len", "--seq_len")
        raise FlagError(f"the size flags give an invalid model: {message}") from None
    return {"depths": sorted(set(depths)), "dtypes": dtypes, "sizes": sizes}


def _markdown(rows: List[Dict[str, Any]], sizes: Dict[str, Any], env: Dict[str, Any], command: str) -> str:
    depths = sorted({r["n_layers"] for r in rows})
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    error = {(r["dtype"], r["n_layers"]): r["relative_error"] for r in rows}
    lines = ["# Reversible reconstruction error", "",
             "Relative error ||x_rec - x||_F / ||x||_F of the stack inputs recomputed by inverting n reversible "
             "layers (the larger of the two streams), at initialisation, dropout off.", "",
             "| layers inverted | " + " | ".join(dtypes) + " |", "| ---: |" + " ---: |" * len(dtypes)]
    for depth in depths:
        lines.append(f"| {depth} | " + " | ".join(f"{error[(d, depth)]:.2e}" for d in dtypes) + " |")
    lines += ["", "Sizes: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + "; residual streams float32.",
              f"float32 target at {max(depths)} layers: < {FLOAT32_TARGET:g}.",
              f"Machine: {env['platform']}, {env['cpu_count']} CPUs, backend {env['backend']} "
              f"({env['device_kind']}); jax {env['jax_version']}, jaxlib {env['jaxlib_version']}.",
              f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}; use --flag=value.")
    try:
        settings = settings_from_flags(FLAGS)
    except FlagError as error:
        raise app.UsageError(str(error)) from None
    rows = []
    for dtype in settings["dtypes"]:
        started = time.perf_counter()
        config = drift_config(dtype, **settings["sizes"])
        rows += measure_drift(config, settings["depths"], batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                              seed=FLAGS.seed)
        print(f"{dtype}: " + ", ".join(f"{r['n_layers']} layers {r['relative_error']:.2e}" for r in rows
                                       if r["dtype"] == dtype) + f" ({time.perf_counter() - started:.1f} s)")
    env = machine()
    command = " ".join(["python -m benchmarks.reversible_drift"] + sys.argv[1:])
    payload = {"rows": rows, "sizes": {**settings["sizes"], "seq_len": FLAGS.seq_len, "batch_size": FLAGS.batch_size,
                                       "seed": FLAGS.seed},
               "machine": env, "command": command}
    output.atomic_write_text(f"{FLAGS.out_dir}/{NAME}.json", json.dumps(payload, indent=2) + "\n")
    output.atomic_write_text(f"{FLAGS.out_dir}/{NAME}.md", _markdown(rows, payload["sizes"], env, command))
    print(f"wrote {FLAGS.out_dir}/{NAME}.json and .md")


if __name__ == "__main__":
    define_flags(FLAGS)
    app.run(main)
