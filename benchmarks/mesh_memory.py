"""Per-device memory of the sharded training step on a mesh of CPU devices (compile-time analysis, nothing run).

    python -m benchmarks.mesh_memory [--out_dir=benchmarks/results] [--devices=8]

Two checks, at the seed's setup (`reformer_jax.model.sizes.SEED`: d_model 512, 8 heads, d_ff 2048, 6 layers, 8 hash
rounds, length 4096; Adafactor, float32), with the host split into --devices CPU devices:
- fsdp: the Reformer on fsdp:N with one sequence per device (global batch N), per-device peak against the bound
  (parameters + gradients + optimizer state) / N + the single-device activations and batch (batch 1), + 10%;
- tensor: the LSH LM (all heads at once) on tensor:2 against one device (batch 1): per-device activations and
  temporaries, and the attention's own temporaries, isolated as the difference between 8 and 4 heads of 64
  (`run_tensor`), which tensor 2 should at least halve.
Writes mesh_memory.{json,csv,md} under --out_dir; `benchmarks.targets.mesh_target_lines` judges them.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from benchmarks import cli
from benchmarks.output import MIB, markdown_table, stamp, write_outputs
from reformer_jax.model.sizes import SEED

FLAGS = flags.FLAGS
SEQ_LEN = SEED.seq_len


def define_flags() -> None:
    flags.DEFINE_string("out_dir", cli.DEFAULT_OUT_DIR, "Where the result files go.")
    flags.DEFINE_integer("devices", 8, "CPU devices the host is split into (the fsdp size).")
    flags.DEFINE_list("checks", ["fsdp", "tensor"], "Which checks to run: fsdp, tensor.")


def _measure(model: str, mesh_text: str, devices: int, batch_size: int, **overrides):
    import jax

    from reformer_jax import ModelConfig
    from reformer_jax.memory import analyze_train_step
    from reformer_jax.sharding import make_mesh, parse_mesh

    config = ModelConfig.preset(model, **{**SEED.model_fields(), **overrides})
    mesh = make_mesh(parse_mesh(mesh_text, devices), jax.devices()[:devices])
    started = time.perf_counter()
    stats = analyze_train_step(config, batch_size=batch_size, seq_len=SEQ_LEN, optimizer="adafactor", mesh=mesh)
    return stats, time.perf_counter() - started


def _row(check: str, model: str, mesh: str, batch_size: int, stats, compile_s: float, **extra):
    row = {"check": check, "model": model, "mesh": mesh, "global_batch": batch_size, "seq_len": SEQ_LEN,
           **stats.to_dict(), "peak_mib": stats.peak_bytes / MIB, "activation_mib": stats.activation_bytes / MIB,
           "state_mib": (2 * stats.param_bytes + stats.optimizer_state_bytes) / MIB, "compile_s": compile_s,
           **extra}
    return stamp(row, cli.command("benchmarks.mesh_memory", sys.argv))


def run_fsdp(n: int):
    one, one_s = _measure("reformer", "data:1", 1, 1)
    sharded, sharded_s = _measure("reformer", f"fsdp:{n}", n, n)
    bound = 1.1 * ((2 * one.param_bytes + one.optimizer_state_bytes) / n + one.activation_bytes + one.batch_bytes)
    return [_row("fsdp", "reformer", "data:1", 1, one, one_s),
            _row("fsdp", "reformer", f"fsdp:{n}", n, sharded, sharded_s, bound_mib=bound / MIB,
                 meets_bound=sharded.peak_bytes <= bound)]


def run_tensor():
    """The LSH LM with 8 and with 4 heads of 64 (d_model 512 either way), on one device and on tensor:2. The
    attention's per-head temporaries are isolated as the difference 8 - 4 heads (the heads' projections, hash
    buckets, sorted copies, chunk scores and outputs, and what autodiff stores of them; nothing else depends on the
    head count); the total activations also hold what tensor leaves whole (the residual stream and LayerNorm
    outputs each layer stores, the output head's chunks)."""
    rows, stats = [], {}
    for mesh, devices in (("data:1", 1), ("tensor:2", 2)):
        for heads in (8, 4):
            stats[mesh, heads], seconds = _measure("lsh", mesh, devices, 1, n_heads=heads, d_head=64)
            rows.append(_row("tensor", "lsh", mesh, 1, stats[mesh, heads], seconds, n_heads=heads))
    per_heads = {m: stats[m, 8].activation_bytes - stats[m, 4].activation_bytes for m in ("data:1", "tensor:2")}
    for row in (r for r in rows if r["n_heads"] == 8):
        row["head_temporaries_mib"] = per_heads[row["mesh"]] / MIB
        if row["mesh"] == "tensor:2":
            row["activation_ratio"] = stats["tensor:2", 8].activation_bytes / stats["data:1", 8].activation_bytes
            row["head_temporaries_ratio"] = per_heads["tensor:2"] / per_heads["data:1"]
            row["halves"] = row["head_temporaries_ratio"] <= 0.5
    return rows


def markdown(rows) -> str:
    optional = lambda key: lambda r: r.get(key)  # noqa: E731
    columns = [("check", "check", "s"), ("model", "model", "s"), ("mesh", "mesh", "s"),
               ("global_batch", "batch", "d"), ("peak_mib", "peak / device (MiB)", ",.1f"),
               ("state_mib", "params + grads + opt / device (MiB)", ",.1f"),
               ("activation_mib", "activations + temporaries / device (MiB)", ",.1f"),
               (optional("bound_mib"), "bound (MiB)", ",.1f"),
               (optional("activation_ratio"), "activations vs 1 device", ".3f"), (optional("n_heads"), "heads", ""),
               (optional("head_temporaries_mib"), "attention temporaries of 4 heads: 8 - 4 heads (MiB)", ",.1f"),
               (optional("head_temporaries_ratio"), "attention temporaries vs 1 device", ".3f")]
    first = rows[0]
    return (markdown_table(rows, columns) + f"\n\njax {first['jax_version']}, jaxlib {first['jaxlib_version']}, "
            f"{first['backend']} ({first['device_kind']}), {first['cpu_count']} cores; seq_len {SEQ_LEN}, Adafactor, "
            f"float32. Command: `{first['command']}`\n")


def main(argv):
    del argv
    import jax

    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    jax.config.update("jax_platforms", "cpu")
    rows = (run_fsdp(FLAGS.devices) if "fsdp" in FLAGS.checks else []) + (run_tensor() if "tensor" in FLAGS.checks
                                                                          else [])
    paths = write_outputs(FLAGS.out_dir, "mesh_memory", rows, markdown(rows))
    print(markdown(rows))
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    define_flags()
    app.run(main)
