"""Reversible reconstruction error: how far the backward pass's recomputed inputs drift from the true ones.

    python -m benchmarks.reversible_drift                          # writes benchmarks/results/reversible_drift.*
    python -m benchmarks.reversible_drift --d_model=64 --seq_len=128 --depths=2,48 --out_dir=/tmp/drift

For each depth n, each compute dtype and each setting (plain float32 streams, the exact-reversal grid
`ModelConfig.stream_grid_bits`): the relative error ||x_rec - x||_F / ||x||_F of the stack inputs the backward pass
recovers through the first n layers of one (n_max)-layer Reformer at initialisation (the larger of the two
streams), and the largest |stream| at the stack's output (`reformer_jax.model.reversible_drift`, which says why the
error grows on plain streams). Residual streams are float32 in both dtypes; "bfloat16" is the blocks' matmuls'.
Also what the grid costs: the relative change of the n_max-layer model's logits, and its loss, grid on and off.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import flags

from reformer_jax import errors
from benchmarks import cli, output
from benchmarks.cli import FlagError
from reformer_jax import ModelConfig
from reformer_jax.model.config import RECOMMENDED_STREAM_GRID_BITS
from reformer_jax.model.reversible_drift import measure_drift, output_change

DTYPES = ("float32", "bfloat16")
NAME = "reversible_drift"
FLOAT32_TARGET = 1e-4  # the bound on the float32 relative error at 48 layers (on the exact-reversal grid)


def drift_config(dtype: str = "float32", **sizes: Any) -> ModelConfig:
    """The Reformer preset at these sizes (and any other field, e.g. stream_grid_bits), deterministic (dropout 0),
    `dtype` compute."""
    return ModelConfig.preset("reformer", dropout=0.0, attention_dropout=0.0, dtype=dtype, **sizes)


# ----------------------------------------------------------------------------------------------------------------
# The command-line driver


@dataclasses.dataclass(frozen=True)
class Settings:
    """A run of the driver; a flag per field.

    Attributes:
      depths: Numbers of layers inverted (the model has the largest).
      dtypes: Compute dtypes measured (float32, bfloat16).
      seq_len: Sequence length (a multiple of --chunk_len).
      batch_size: Sequences.
      seed: Seed of parameters, tokens, hashes.
      grid_bits: k of the exact-reversal grid measured against plain float32 streams (ModelConfig.stream_grid_bits).
      out_dir: Where reversible_drift.json / .md are written.
    """

    depths: Tuple[int, ...] = (2, 4, 8, 12, 16, 24, 32, 48)
    dtypes: Tuple[str, ...] = DTYPES
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    seq_len: int = 1024
    chunk_len: int = 64
    n_hashes: int = 4
    batch_size: int = 1
    seed: int = 0
    grid_bits: int = RECOMMENDED_STREAM_GRID_BITS
    out_dir: str = cli.DEFAULT_OUT_DIR
    command: str = "python -m benchmarks.reversible_drift"


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    cli.define_flags(Settings, fv)


def settings_from_flags(fv: flags.FlagValues, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Validated settings: {depths, dtypes, grids, sizes, ...}; FlagError naming the flag and what would work."""
    s = cli.settings_from_flags(Settings, fv, "benchmarks.reversible_drift", argv, choices={"dtypes": DTYPES},
                                minimum={"seed": 0, "grid_bits": None})
    if s.d_model % s.n_heads:
        raise FlagError(f"--d_model={s.d_model} is not divisible by --n_heads={s.n_heads}.")
    try:
        drift_config(stream_grid_bits=s.grid_bits, chunk_len=1)
    except ValueError as error:
        raise FlagError(errors.in_flags(error, {"stream_grid_bits": "grid_bits"})) from None
    if s.grid_bits == 0:
        raise FlagError("--grid_bits=0 is invalid: the grid is measured against plain streams (0); pick k >= 1, "
                        f"e.g. {RECOMMENDED_STREAM_GRID_BITS}.")
    sizes = dict(d_model=s.d_model, n_heads=s.n_heads, d_ff=s.d_ff, n_layers=max(s.depths), max_len=s.seq_len,
                 chunk_len=s.chunk_len, n_hashes=s.n_hashes)
    try:
        for dtype in s.dtypes:
            drift_config(dtype, **sizes).check_seq_len(s.seq_len)
    except ValueError as error:
        message = errors.in_flags(error, {"max_len": "seq_len"})
        raise FlagError(f"the size flags give an invalid model: {message}") from None
    return {"depths": sorted(set(s.depths)), "dtypes": list(s.dtypes), "grids": [0, s.grid_bits], "sizes": sizes,
            "sample": dict(seq_len=s.seq_len, batch_size=s.batch_size, seed=s.seed), "out_dir": s.out_dir,
            "command": s.command}


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
             output.markdown_table(
                 [{s: by_key[s + (depth,)] for s in settings} | {"n_layers": depth} for depth in depths],
                 [("n_layers", "layers", "d")] + [(lambda r, s=s: r[s]["relative_error"], _setting(*s), ".2e")
                                                  for s in settings]
                 + [(lambda r: max(r[s]["max_abs_stream"] for s in settings), "max abs stream", ".1f")]),
             "What the grid changes in the model's output at initialisation (same parameters and tokens, "
             f"{max(depths)} layers, grid on against off):", "",
             output.markdown_table(changes, [
                 (lambda c: f"{c['dtype']}, grid 2^-{c['grid_bits']}", "compute", "s"),
                 ("logits_relative_change", "relative change of the logits", ".2e"),
                 ("logits_max_abs_change", "largest logit change", ".2e"), ("loss_grid_off", "loss off", ".6f"),
                 ("loss_grid_on", "loss on", ".6f")]).rstrip("\n")]
    lines += ["", "Sizes: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + "; residual streams float32.",
              f"float32 target at {max(depths)} layers: < {FLOAT32_TARGET:g}.",
              f"Machine: {env['platform']}, {env['cpu_count']} CPUs, backend {env['backend']} "
              f"({env['device_kind']}); jax {env['jax_version']}, jaxlib {env['jaxlib_version']}.",
              f"Command: `{command}`", ""]
    return "\n".join(lines)


def run(settings: Dict[str, Any]) -> None:
    sample = settings["sample"]
    rows, changes = [], []
    for dtype in settings["dtypes"]:
        for grid_bits in settings["grids"]:
            started = time.perf_counter()
            measured = measure_drift(drift_config(dtype, stream_grid_bits=grid_bits, **settings["sizes"]),
                                     settings["depths"], **sample)
            rows += measured
            print(f"{_setting(dtype, grid_bits)}: " + ", ".join(f"{r['n_layers']} layers {r['relative_error']:.2e}"
                                                                for r in measured)
                  + f" (max |stream| {max(r['max_abs_stream'] for r in measured):.1f}; "
                  f"{time.perf_counter() - started:.1f} s)", flush=True)
        changes.append(output_change(drift_config(dtype, **settings["sizes"]), settings["grids"][-1], **sample))
        print(f"{dtype}: grid on changes the logits by {changes[-1]['logits_relative_change']:.2e} (relative), "
              f"the loss {changes[-1]['loss_grid_off']:.6f} -> {changes[-1]['loss_grid_on']:.6f}", flush=True)
    env, command, base = output.machine(), settings["command"], f"{settings['out_dir']}/{NAME}"
    payload = {"rows": rows, "output_change": changes, "sizes": {**settings["sizes"], **sample}, "machine": env,
               "command": command}
    output.atomic_write_text(base + ".json", json.dumps(payload, indent=2) + "\n")
    output.atomic_write_text(base + ".md", _markdown(rows, changes, payload["sizes"], env, command))
    print(f"wrote {base}.json and .md")


if __name__ == "__main__":
    define_flags()
    cli.main(settings_from_flags, run)
