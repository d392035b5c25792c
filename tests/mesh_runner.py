"""Trains the tiny test model on N CPU devices over a --mesh, in its own process (XLA's host device count is fixed
when jax starts): python -m tests.mesh_runner DEVICES OUT.npz RUN [RUN ...] from the repository root, each RUN
mesh@workdir@steps[@crash_at], trained on the first devices of the process (as many as the mesh spans).

Writes, per run, its per-step losses and final parameters to OUT.npz (keys "<i>/losses", "<i>/params/<j>").
crash_at: the run is killed (KeyboardInterrupt) when it asks for that step's batch, after its checkpoints.
"""

import math
import os
import sys

import numpy as np

import jax

jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))
jax.config.update("jax_platforms", "cpu")

from reformer_jax import ModelConfig

from reformer_jax.training import data  # noqa: E402
from reformer_jax.training.loop import TrainOptions, train_and_evaluate  # noqa: E402
from tests.corpus import CrashAt  # noqa: E402

TINY = dict(vocab_size=259, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=64, chunk_len=16, n_hashes=2,
            dropout=0.1)


def main():
    assert jax.device_count() == int(sys.argv[1]), jax.devices()
    out = {}
    task = data.CopyTask(vocab_size=259)
    for i, run in enumerate(sys.argv[3:]):
        mesh, workdir, steps, *crash = run.split("@")
        config = ModelConfig.preset(os.environ.get("MESH_TEST_MODEL", "reformer"), **TINY)
        device_count = math.prod(int(part.split(":")[1]) for part in mesh.split(","))  # the first N devices
        options = TrainOptions(workdir=workdir, steps=int(steps), batch_size=8, seq_len=64, eval_every=0,
                               checkpoint_every=3, sample_len=0, analyze_memory=False, learning_rate=3e-3,
                               warmup_steps=2, mesh=mesh, device_count=device_count)
        try:
            summary = train_and_evaluate(config, options, dataset=CrashAt(task, int(crash[0])) if crash else task)
        except KeyboardInterrupt:
            continue
        rows = [line for line in open(os.path.join(workdir, "metrics.jsonl"))]
        import json
        out[f"{i}/losses"] = np.array([json.loads(r)["loss"] for r in rows], np.float64)
        for j, leaf in enumerate(jax.tree.leaves(jax.device_get(summary["state"].params))):
            out[f"{i}/params/{j}"] = np.asarray(leaf)
    np.savez(sys.argv[2], **out)
    print("OK")


if __name__ == "__main__":
    main()
