"""Curves of one or several main.py runs, from their metrics.jsonl, drawn to one PNG.

    python -m reformer_jax.plot --workdir=runs/a                       # -> curves.png
    python -m reformer_jax.plot --workdir=runs/a runs/b runs/c --out=compare.png

Four panels against the optimizer step: training loss (bits per token, smoothed over --smooth steps), validation
bits per token (validation accuracy for runs of symbols: the copy task, ListOps), training throughput (tokens/s, smoothed) and the learning
rate. One curve per run in each panel, labelled with the workdir's name. The throughput leaves out the first step
of each invocation (it includes compilation).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from absl import flags

from reformer_jax import cli

FLAGS = flags.FLAGS
PANELS = (("bpc", "training loss (bits per token)", True), ("val", "validation", False),
          ("tokens_per_sec", "tokens / s", True), ("learning_rate", "learning rate", False))


def read_metrics(workdir: str) -> List[Dict[str, float]]:
    """The rows of workdir/metrics.jsonl (a line cut short by a kill is skipped)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"--workdir={workdir} has no metrics.jsonl; pass the --workdir of a main.py run.")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _scored_by_accuracy(workdir: str) -> bool:
    """A run of symbols, not text (the copy task, ListOps: no tokenizer recorded), is judged by its accuracy."""
    settings = Path(workdir) / "run_settings.json"
    return settings.is_file() and json.loads(settings.read_text()).get("tokenizer", "text") is None


def _smoothed(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over `window` values (non-finite values skipped)."""
    out, kept = [], []
    for v in values:
        if math.isfinite(v):
            kept.append(v)
            kept = kept[-window:]
        out.append(sum(kept) / len(kept) if kept else float("nan"))
    return out


def plot_runs(workdirs: Sequence[str], out: str, smooth: int = 10) -> Dict[str, int]:
    """Draw the runs' curves to `out` (PNG); returns {panel: number of curves drawn}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(w).name or str(w), read_metrics(w)) for w in workdirs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    drawn = {}
    copy_task = all(_scored_by_accuracy(w) for w in workdirs)
    for ax, (key, title, smoothed) in zip(axes.flat, PANELS):
        count = 0
        for label, rows in runs:
            if key == "val":
                points = [r for r in rows if "val_loss" in r]
                ys = [r["val_accuracy"] if copy_task else r["val_bpc"] for r in points]
                style = "o-"
            else:
                points = [r for r in rows if key in r and not (key == "tokens_per_sec" and
                                                                r.get("includes_compilation"))]
                ys = [float(r[key]) for r in points]
                ys = _smoothed(ys, smooth) if smoothed else ys
                style = "-"
            if points:
                ax.plot([r["step"] for r in points], ys, style, label=label, markersize=3)
                count += 1
        if key == "bpc" and copy_task:  # a classifier's loss is per example, a copy task's per symbol
            title = "training loss (bits)"
        ax.set_title(title + (" accuracy" if key == "val" and copy_task else
                              " (bits per token)" if key == "val" else "")
                     + (f", mean of {smooth} steps" if smoothed and smooth > 1 else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if count:
            ax.legend(fontsize=8)
        drawn[key] = count
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def main(argv) -> int:
    workdirs = [*(FLAGS.workdir or []), *argv[1:]]
    if not workdirs:
        raise cli.UsageError("--workdir=DIR is required (several: --workdir=DIR1 DIR2 ...).")
    if FLAGS.smooth < 1:
        raise cli.UsageError(f"--smooth={FLAGS.smooth} is invalid: expected a positive integer (1: no smoothing).")
    try:
        drawn = plot_runs(workdirs, FLAGS.out, FLAGS.smooth)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{FLAGS.out}: {len(workdirs)} run{'s' if len(workdirs) > 1 else ''}, "
          + ", ".join(f"{key} {n} curve{'s' if n != 1 else ''}" for key, n in drawn.items()))
    return 0


if __name__ == "__main__":
    flags.DEFINE_multi_string("workdir", None, "A main.py --workdir; repeat the flag or list more directories "
                              "after it.")
    flags.DEFINE_string("out", "curves.png", "The PNG to write.")
    flags.DEFINE_integer("smooth", 10, "Training curves: mean over this many steps (1: raw).")
    cli.run(main)
