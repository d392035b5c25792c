"""Reversible reconstruction error: how far the backward pass's recomputed inputs drift from the true ones.

    python -m benchmarks.reversible_drift                          # writes benchmarks/results/reversible_drift.*
    python -m benchmarks.reversible_drift --d_model=64 --seq_len=128 --depths=2,48 --out_dir=/tmp/drift

The backward pass of the reversible stack never stores a layer's inputs: it recomputes them from the outputs,
x2 = y2 - G(y1), x1 = y1 - F(x2), last layer first, with the forward pass's bucket ids. On plain float32 streams
each forward sum y = x + F rounds away x's low bits, so the subtraction cannot give them back, and the error of x2
passes through F into x1: the error grows with depth. On the exact-reversal grid (ModelConfig.stream_grid_bits,
see `reformer_jax.kernels.reversible`) the sums are exact and the inputs come back bit for bit while |stream| stays below
2^(24 - k).

For each depth n, each compute dtype and each setting (grid off, grid on) this runs the stack's own forward and
backward passes (`reformer_jax.kernels.reversible.recovered_inputs`, random cotangents, as in a training step) over the
first n layers of one (n_max)-layer Reformer at initialisation, dropout off, on the embedded tokens, and reports
the relative error of the recovered stack inputs ||x_rec - x||_F / ||x||_F (the larger of the two streams) and the
largest |stream| at the stack's output. Residual streams are float32 in both dtypes; "bfloat16" is the dtype of the
blocks' matmuls (ModelConfig.dtype). It also reports what the grid costs: the relative change of the n_max-layer
model's logits, and its loss, grid on against grid off.
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

from benchmarks import cli, output
from benchmarks.cli import FlagError
from benchmarks.measure import machine
from reformer_jax import ModelConfig
from reformer_jax.model.config import RECOMMENDED_STREAM_GRID_BITS
from reformer_jax.model.reformer_lm import ReformerLM, block_functions, init_params
from reformer_jax.kernels.reversible import recovered_inputs, to_grid

DTYPES = ("float32", "bfloat16")
NAME = "reversible_drift"
FLOAT32_TARGET = 1e-4  # the bound on the float32 relative error at 48 layers (on the exact-reversal grid)


def drift_config(dtype: str = "float32", **sizes: Any) -> ModelConfig:
    """The Reformer preset at these sizes (and any other field, e.g. stream_grid_bits), deterministic (dropout 0),
    `dtype` compute."""
    return ModelConfig.preset("reformer", dropout=0.0, attention_dropout=0.0, dtype=dtype, **sizes)


def stack_inputs(config: ModelConfig, params: Any, tokens: jax.Array) -> jax.Array:
    """The embedded tokens the model feeds its layer stack: token embedding + positions, on the stack's grid.
    [b, l] -> [b, l, d]."""
    positions = ReformerLM(config).apply({"params": params}, tokens.shape[1],
                                         method=lambda model, length: model.positions(length))
    x = jnp.take(params["embed"], tokens, axis=0).astype(jnp.float32) + positions.astype(jnp.float32)
    return to_grid(x, config.grid_bits)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _recovered(config: ModelConfig, depth: int, layer_params, keys, x, cotangents):
    """Through the first `depth` layers: the inputs (x1, x2) as the stack's backward pass recovers them
    [2, b, l, d], and the largest |y1|, |y2| of their output (how close the streams come to the grid's range)."""
    attention_fn, feed_forward_fn, reverse_fn = block_functions(config, config.layer_types[0], deterministic=True)
    first_params, first_keys = jax.tree.map(lambda leaf: leaf[:depth], (layer_params, keys))
    recovered, outputs = recovered_inputs(attention_fn, feed_forward_fn, first_params, x, x, first_keys,
                                          *cotangents, ff_chunk_len=config.ff_chunk_len,
                                          attention_reverse_fn=reverse_fn, grid_bits=config.grid_bits)
    return jnp.stack(recovered), jnp.max(jnp.abs(jnp.stack(outputs)))


def _relative_error(recovered: np.ndarray, true: np.ndarray) -> float:
    """max over the two streams of ||recovered - true||_F / ||true||_F, in float64."""
    recovered, true = np.asarray(recovered, np.float64), np.asarray(true, np.float64)
    return max(float(np.linalg.norm(r - t) / np.linalg.norm(t)) for r, t in zip(recovered, true))


def _example(config: ModelConfig, batch_size: int, seq_len: int, seed: int):
    """(parameters, tokens [b, l], per-layer keys [n, 2]) of the measurement, the same for every setting."""
    params = init_params(config, jax.random.key(seed))
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch_size, seq_len), 3, config.vocab_size)
    return params, tokens, jax.random.split(jax.random.key(seed + 2), (config.n_layers, 2))


def measure_drift(config: ModelConfig, depths: Sequence[int], *, batch_size: int, seq_len: int,
                  seed: int = 0) -> List[Dict[str, Any]]:
    """One row per depth n: relative error of the stack inputs recovered through the first n layers.

    `config.n_layers` must be at least max(depths); shallower depths use the model's first layers. The grid is
    `config.stream_grid_bits` (0: plain float32 streams).
    """
    if max(depths) > config.n_layers or min(depths) < 1:
        raise ValueError(f"depths {tuple(depths)} must lie in [1, n_layers={config.n_layers}].")
    params, tokens, keys = _example(config, batch_size, seq_len, seed)
    x = stack_inputs(config, params, tokens)
    cotangents = jax.random.normal(jax.random.key(seed + 3), (2,) + x.shape)
    true_inputs = np.stack([np.asarray(x)] * 2)
    rows = []
    for depth in depths:
        recovered, max_stream = _recovered(config, depth, params["layers"], keys, x, cotangents)
        recovered = np.asarray(recovered, np.float64)
        rows.append({"dtype": config.dtype, "grid_bits": config.grid_bits, "n_layers": int(depth),
                     "relative_error": _relative_error(recovered, true_inputs),
                     "max_abs_error": float(np.max(np.abs(recovered - true_inputs))),
                     "input_rms": float(np.sqrt(np.mean(true_inputs.astype(np.float64) ** 2))),
                     "max_abs_stream": float(max_stream)})
    return rows


def output_change(config: ModelConfig, grid_bits: int, *, batch_size: int, seq_len: int,
                  seed: int = 0) -> Dict[str, Any]:
    """What the grid changes in the whole model's output at initialisation: the relative Frobenius change of the
    logits and the next-token loss (nats), grid on (`grid_bits`) against grid off, same parameters and tokens."""
    params, tokens, _ = _example(config, batch_size, seq_len, seed)
    rngs = {"lsh": jax.random.key(seed + 4)}

    def logits_and_loss(bits):
        logits = ReformerLM(config.replace(stream_grid_bits=bits)).apply({"params": params}, tokens, rngs=rngs)
        log_probs = jax.nn.log_softmax(logits[:, :-1])
        loss = -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))
        return np.asarray(logits, np.float64), float(loss)

    (plain, loss_plain), (grid, loss_grid) = logits_and_loss(0), logits_and_loss(grid_bits)
    return {"dtype": config.dtype, "grid_bits": grid_bits, "n_layers": config.n_layers,
            "logits_relative_change": float(np.linalg.norm(grid - plain) / np.linalg.norm(plain)),
            "logits_max_abs_change": float(np.max(np.abs(grid - plain))), "loss_grid_off": loss_plain,
            "loss_grid_on": loss_grid}


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
    flags.DEFINE_integer("grid_bits", RECOMMENDED_STREAM_GRID_BITS, "k of the exact-reversal grid measured against "
                         "plain float32 streams (ModelConfig.stream_grid_bits).", flag_values=fv)
    flags.DEFINE_string("out_dir", "benchmarks/results", "Where reversible_drift.json / .md are written.",
                        flag_values=fv)


def settings_from_flags(fv: flags.FlagValues) -> Dict[str, Any]:
    """Validated settings: {depths, dtypes, grids, sizes}; FlagError naming the flag and what would work."""
    depths = list(cli.int_list("depths", fv.depths, "2,8,48"))
    dtypes = list(cli.subset("dtypes", fv.dtypes, DTYPES))
    for name in ("d_model", "n_heads", "d_ff", "seq_len", "chunk_len", "n_hashes", "batch_size"):
        if fv[name].value < 1:
            raise FlagError(f"--{name}={fv[name].value} is invalid: expected a positive integer.")
    if fv.d_model % fv.n_heads:
        raise FlagError(f"--d_model={fv.d_model} is not divisible by --n_heads={fv.n_heads}.")
    if fv.seed < 0:
        raise FlagError(f"--seed={fv.seed} is invalid: expected an integer >= 0.")
    try:
        drift_config(stream_grid_bits=fv.grid_bits, chunk_len=1)
    except ValueError as error:
        raise FlagError(str(error).replace("ModelConfig.stream_grid_bits", "--grid_bits")) from None
    if fv.grid_bits == 0:
        raise FlagError("--grid_bits=0 is invalid: the grid is measured against plain streams (0); pick k >= 1, "
                        f"e.g. {RECOMMENDED_STREAM_GRID_BITS}.")
    sizes = dict(d_model=fv.d_model, n_heads=fv.n_heads, d_ff=fv.d_ff, n_layers=max(depths), max_len=fv.seq_len,
                 chunk_len=fv.chunk_len, n_hashes=fv.n_hashes)
    try:
        for dtype in dtypes:
            drift_config(dtype, **sizes).check_seq_len(fv.seq_len)
    except ValueError as error:
        message = str(error).replace("ModelConfig.", "--").replace("--max_len", "--seq_len")
        raise FlagError(f"the size flags give an invalid model: {message}") from None
    return {"depths": sorted(set(depths)), "dtypes": dtypes, "grids": [0, fv.grid_bits], "sizes": sizes}


def _setting(dtype: str, grid_bits: int) -> str:
    return f"{dtype}, " + (f"grid 2^-{grid_bits}" if grid_bits else "plain")


def _markdown(rows: List[Dict[str, Any]], changes: List[Dict[str, Any]], sizes: Dict[str, Any],
              env: Dict[str, Any], command: str) -> str:
    depths = sorted({r["n_layers"] for r in rows})
    settings = list(dict.fromkeys((r["dtype"], r["grid_bits"]) for r in rows))
    by_key = {(r["dtype"], r["grid_bits"], r["n_layers"]): r for r in rows}
    lines = ["# Reversible reconstruction error", "",
             "Relative error ||x_rec - x||_F / ||x||_F of the stack inputs as the stack's backward pass recovers "
             "them through n reversible layers (the larger of the two streams), at initialisation, dropout off; "
             "plain float32 streams and streams on the exact-reversal grid (ModelConfig.stream_grid_bits = k: "
             "multiples of 2^-k, exact while |stream| < 2^(24 - k)). Last column: the largest |stream| at the "
             "n layers' output (the largest over the settings).", "",
             "| layers | " + " | ".join(_setting(*s) for s in settings) + " | max abs stream |",
             "| ---: |" + " ---: |" * (len(settings) + 1)]
    for depth in depths:
        largest = max(by_key[s + (depth,)]["max_abs_stream"] for s in settings)
        lines.append(f"| {depth} | " + " | ".join(f"{by_key[s + (depth,)]['relative_error']:.2e}" for s in settings)
                     + f" | {largest:.1f} |")
    lines += ["", "What the grid changes in the model's output at initialisation (same parameters and tokens, "
              f"{max(depths)} layers, grid on against off):", "",
              "| compute | relative change of the logits | largest logit change | loss off | loss on |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for c in changes:
        lines.append(f"| {c['dtype']}, grid 2^-{c['grid_bits']} | {c['logits_relative_change']:.2e} | "
                     f"{c['logits_max_abs_change']:.2e} | {c['loss_grid_off']:.6f} | {c['loss_grid_on']:.6f} |")
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
    sample = dict(batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, seed=FLAGS.seed)
    rows, changes = [], []
    for dtype in settings["dtypes"]:
        for grid_bits in settings["grids"]:
            started = time.perf_counter()
            config = drift_config(dtype, stream_grid_bits=grid_bits, **settings["sizes"])
            measured = measure_drift(config, settings["depths"], **sample)
            rows += measured
            print(f"{_setting(dtype, grid_bits)}: " + ", ".join(f"{r['n_layers']} layers {r['relative_error']:.2e}"
                                                                for r in measured)
                  + f" (max |stream| {max(r['max_abs_stream'] for r in measured):.1f}; "
                  f"{time.perf_counter() - started:.1f} s)", flush=True)
        changes.append(output_change(drift_config(dtype, **settings["sizes"]), settings["grids"][-1], **sample))
        print(f"{dtype}: grid on changes the logits by {changes[-1]['logits_relative_change']:.2e} (relative), "
              f"the loss {changes[-1]['loss_grid_off']:.6f} -> {changes[-1]['loss_grid_on']:.6f}", flush=True)
    env = machine()
    command = " ".join(["python -m benchmarks.reversible_drift"] + sys.argv[1:])
    payload = {"rows": rows, "output_change": changes,
               "sizes": {**settings["sizes"], "seq_len": FLAGS.seq_len, "batch_size": FLAGS.batch_size,
                         "seed": FLAGS.seed},
               "machine": env, "command": command}
    output.atomic_write_text(f"{FLAGS.out_dir}/{NAME}.json", json.dumps(payload, indent=2) + "\n")
    output.atomic_write_text(f"{FLAGS.out_dir}/{NAME}.md", _markdown(rows, changes, payload["sizes"], env, command))
    print(f"wrote {FLAGS.out_dir}/{NAME}.json and .md")


if __name__ == "__main__":
    define_flags(FLAGS)
    app.run(main)
