"""Quality benchmark: what the memory savings cost in accuracy, on tiny Shakespeare and the paper's copy task.

    python -m benchmarks.quality                                                     # both tasks, about 90 min
    python -m benchmarks.quality --task=shakespeare --budget_minutes=15
    python -m benchmarks.quality --task=synthetic

Every model is trained by main.py's own loop (`reformer_jax.training.loop.train_and_evaluate`) with the same
steps, seed and data order, each stopped at --budget_minutes of wall time (compilation included) if it has not
finished by then. Runs live in --workdir/<task>/<variant>: a rerun resumes unfinished runs and rescores finished
ones. shakespeare: byte-level tiny Shakespeare (validation: the last 10%), the seed's four variants, the Reformer
at more hash rounds and (--mixed_reformer) in Hugging Face's local/LSH layout; each scored with every --eval_hashes,
with how far later tokens move earlier log-probabilities (`future_influence`) and the bits per character with the
future masked (`honest_bpc`). synthetic: the duplication task 0 w 0 w (paper section 5), one layer, full attention
and LSH at each --synthetic_train_hashes, each evaluated with every setting (the paper's Table 2).
Outputs in --out_dir: quality_<task>.json (one row per model: config, curve, every score, command, machine), .csv,
.md and .png (learning curves against step and wall time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import flags

from reformer_jax import errors
from benchmarks import cli, output
from benchmarks.cli import DEFAULT_OUT_DIR, FlagError
from benchmarks.output import Row
from reformer_jax.model.sizes import QUALITY_COPY, QUALITY_SHAKESPEARE

TASKS = ("shakespeare", "synthetic")
BUDGET_SPENT = "budget_spent.json"  # in a run's workdir: it stopped at --budget_minutes (a rerun does not extend it)
S, C = QUALITY_SHAKESPEARE, QUALITY_COPY  # the two tasks' default sizes
COUNTS = [  # the integer flags, each checked positive: (name, default, help)
    ("steps", 2300, "shakespeare: optimizer steps per variant."),
    ("seq_len", S.seq_len, "shakespeare: tokens per sequence (a multiple of --chunk_len)."),
    ("batch_size", S.batch_size, "shakespeare: sequences per step."),
    ("d_model", S.d_model, "shakespeare: width of the residual streams."),
    ("n_heads", S.n_heads, "Attention heads (both tasks)."), ("d_ff", S.d_ff, "shakespeare: feed-forward width."),
    ("n_layers", S.n_layers, "shakespeare: layers."), ("chunk_len", S.chunk_len, "LSH chunk length (both tasks)."),
    ("eval_every", 100, "shakespeare: validation points on the learning curve every this many steps."),
    ("eval_batches", 8, "Validation batches of the final scores (the curve uses 2)."),
    ("influence_sequences", 4, "shakespeare: validation sequences of the future-influence and future-masked "
                               "measurements."),
    ("honest_positions", 32, "shakespeare: positions scored with the future masked, per sequence."),
    ("synthetic_steps", 1500, "synthetic: optimizer steps per model."),
    ("synthetic_d_model", C.d_model, "synthetic: width of the residual streams."),
    ("synthetic_d_ff", C.d_ff, "synthetic: feed-forward width."),
    ("synthetic_seq_len", C.seq_len, "synthetic: sequence length (0 w 0 w; even, a multiple of --chunk_len)."),
    ("synthetic_batch_size", C.batch_size, "synthetic: sequences per step."),
    ("synthetic_vocab_size", C.vocab_size, "synthetic: symbols (w is drawn from 1..vocab-1)."),
    ("synthetic_eval_every", 100, "synthetic: validation points on the learning curve.")]


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The driver's flags, on `fv` (tests pass their own FlagValues)."""
    on = dict(flag_values=fv)
    flags.DEFINE_enum("task", "all", TASKS + ("all",), "Which task to run (all: shakespeare, then synthetic).", **on)
    flags.DEFINE_float("budget_minutes", 15.0, "Wall-time limit of each variant's training, compilation included; a "
                       "variant still short of --steps then stops and reports the step it reached.", **on)
    flags.DEFINE_string("out_dir", DEFAULT_OUT_DIR, "Where quality_<task>.{json,csv,md,png} go.", **on)
    flags.DEFINE_string("workdir", os.path.join("runs", "quality"), "Training runs (checkpoints, metrics.jsonl) go to "
                        "WORKDIR/<task>/<variant>; a rerun resumes them.", **on)
    flags.DEFINE_enum("dataset", "tiny_shakespeare", ["tiny_shakespeare", "text"], "The shakespeare task's text: tiny "
                      "Shakespeare (checked by sha256) or any file (--dataset=text --data_path=FILE).", **on)
    flags.DEFINE_string("data_path", None, "Path of the text (tiny_shakespeare: default the packaged copy).", **on)
    flags.DEFINE_integer("seed", 0, "Seed of parameters, data order, hashing and dropout (every variant's).", **on)
    for name, default, help_ in COUNTS:
        flags.DEFINE_integer(name, default, help_, **on)
    flags.DEFINE_list("train_hashes", ["4", "8"], "shakespeare: hash rounds of the Reformer runs; the LSH LM uses the "
                      "first.", **on)
    flags.DEFINE_enum("head", "untied", ("untied", "tied"), "shakespeare: the output head of every model. untied: its "
                      "own projection, the reversible models concatenating their two streams (trax, Hugging Face); "
                      "tied: the presets' default, the token embedding, the reversible streams averaged.", **on)
    flags.DEFINE_boolean("mixed_reformer", True, "shakespeare: also train the Reformer in Hugging Face's / trax's "
                         "enwik8 layout, local and LSH layers alternating, with the first --train_hashes rounds "
                         "(reformer-N-local); reported beside the targets, which are judged on the all-LSH ones.", **on)
    flags.DEFINE_list("variants", None, "shakespeare: train only these models (names as in the tables: transformer, "
                      "lsh-4, reversible, reformer-4, reformer-8, reformer-4-local by default); default all.", **on)
    flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (AdamW, warm-up + cosine; both tasks).", **on)
    flags.DEFINE_list("eval_hashes", ["1", "2", "4", "8"], "Hash rounds the trained models are evaluated with.", **on)
    flags.DEFINE_list("synthetic_train_hashes", ["full", "1", "2", "4"], "synthetic: the models trained: 'full' "
                      "(full attention) and/or LSH hash rounds.", **on)
    flags.DEFINE_enum("synthetic_pos_embedding", "absolute", ["absolute", "axial"], "synthetic: positional embedding "
                      "(with axial ones the one-layer full-attention model stalled at 82% here).", **on)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One trained model: its name in the tables, the ModelConfig preset and its overrides."""

    name: str
    preset: str
    overrides: Tuple[Tuple[str, Any], ...]

    def config(self):
        from reformer_jax.model.config import ModelConfig

        return ModelConfig.preset(self.preset, **dict(self.overrides))

    @property
    def n_hashes(self) -> Optional[int]:
        return dict(self.overrides).get("n_hashes") if self.config().uses("lsh") else None


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    """Everything one task trains and measures, checked before anything is compiled."""

    task: str
    variants: Tuple[Variant, ...]
    steps: int
    seq_len: int
    batch_size: int
    eval_every: int
    dataset: str
    data_path: Optional[str]
    vocab_size: int


def head_overrides(head: str, reversible: bool) -> Dict[str, Any]:
    """ModelConfig fields of a --head choice for one model."""
    if head == "tied":
        return {"output_head": "mean", "tie_embeddings": True}
    return {"output_head": "concat" if reversible else "mean", "tie_embeddings": False}


def shakespeare_plan(fv) -> TaskPlan:
    """The four variants at the shakespeare sizes, the Reformer once per --train_hashes value."""
    hashes = cli.int_list("train_hashes", fv.train_hashes, "4,8")
    sizes = {"d_model": fv.d_model, "n_heads": fv.n_heads, "d_ff": fv.d_ff, "chunk_len": fv.chunk_len,
             "max_len": fv.seq_len, "dropout": 0.0, "n_layers": fv.n_layers}
    plain, reversible = ({**sizes, **head_overrides(fv.head, r)} for r in (False, True))
    variants = [Variant("transformer", "transformer", tuple(plain.items())),
                Variant(f"lsh-{hashes[0]}", "lsh", tuple({**plain, "n_hashes": hashes[0]}.items())),
                Variant("reversible", "reversible", tuple(reversible.items()))]
    variants += [Variant(f"reformer-{h}", "reformer", tuple({**reversible, "n_hashes": h}.items())) for h in hashes]
    if fv.mixed_reformer:
        if fv.n_layers % 2:
            raise FlagError(f"--n_layers={fv.n_layers} is odd: --mixed_reformer alternates local and LSH layers; use "
                            f"an even --n_layers or --nomixed_reformer.")
        layout = ("local", "lsh") * (fv.n_layers // 2)
        variants.append(Variant(f"reformer-{hashes[0]}-local", "reformer",
                                tuple({**reversible, "n_hashes": hashes[0], "attn_layers": layout}.items())))
    if fv.variants:
        names = [v.name for v in variants]
        unknown = [name for name in fv.variants if name not in names]
        if unknown:
            raise FlagError(f"--variants={','.join(fv.variants)}: {', '.join(unknown)} unknown; the shakespeare "
                            f"models with these --train_hashes are {', '.join(names)}.")
        variants = [v for v in variants if v.name in fv.variants]
    return TaskPlan("shakespeare", tuple(variants), fv.steps, fv.seq_len, fv.batch_size, fv.eval_every,
                    fv.dataset, fv.data_path, 259)


def synthetic_plan(fv) -> TaskPlan:
    """One-layer models of the copy task: full attention and LSH at each --synthetic_train_hashes value."""
    sizes = {"d_model": fv.synthetic_d_model, "n_heads": fv.n_heads, "d_ff": fv.synthetic_d_ff,
             "chunk_len": fv.chunk_len, "max_len": fv.synthetic_seq_len, "dropout": 0.0,
             "n_layers": QUALITY_COPY.n_layers, "vocab_size": fv.synthetic_vocab_size,
             "pos_embedding": fv.synthetic_pos_embedding}
    trained = cli.int_list("synthetic_train_hashes", fv.synthetic_train_hashes, "full,1,2,4", words=("full",))
    variants = [Variant("full", "transformer", tuple(sizes.items())) if h == "full" else
                Variant(f"lsh-{h}", "lsh", tuple({**sizes, "n_hashes": h}.items())) for h in trained]
    return TaskPlan("synthetic", tuple(variants), fv.synthetic_steps, fv.synthetic_seq_len, fv.synthetic_batch_size,
                    fv.synthetic_eval_every, "synthetic", None, fv.synthetic_vocab_size)


def check_flags(fv) -> List[TaskPlan]:
    """The tasks' plans; raises FlagError naming the flag for any bad value (no compilation happens here)."""
    for name in ["budget_minutes"] + [name for name, _, _ in COUNTS] + ["learning_rate"]:
        value = fv[name].value
        if value is None or not value > 0 or not math.isfinite(value):
            raise FlagError(f"--{name}={value} is invalid: expected a positive number.")
    cli.int_list("eval_hashes", fv.eval_hashes, "1,2,4,8")  # checked here, before anything compiles
    if fv.honest_positions > fv.seq_len:
        raise FlagError(f"--honest_positions={fv.honest_positions} is more than --seq_len={fv.seq_len}.")
    if fv.synthetic_seq_len % 2 or fv.synthetic_vocab_size < 2:
        raise FlagError(f"--synthetic_seq_len={fv.synthetic_seq_len} / --synthetic_vocab_size="
                        f"{fv.synthetic_vocab_size}: the copy task needs an even length and at least 2 symbols.")
    if fv.dataset == "text" and not fv.data_path:
        raise FlagError("--dataset=text needs --data_path=FILE.")
    plans = [shakespeare_plan(fv) if task == "shakespeare" else synthetic_plan(fv)
             for task in (TASKS if fv.task == "all" else (fv.task,))]
    for plan in plans:
        for variant in plan.variants:
            try:
                variant.config().check_seq_len(plan.seq_len)
            except ValueError as error:  # e.g. a length the LSH chunks do not divide
                raise FlagError(f"--{'synthetic_' if plan.task == 'synthetic' else ''}seq_len={plan.seq_len} "
                                f"({variant.name}): " + errors.in_flags(error)) from None
    return plans


# ----------------------------------------------------------------------------------------------------------------
# Training and scoring


def _options(fv, plan: TaskPlan, variant: Variant):
    from reformer_jax.training.loop import TrainOptions

    workdir = os.path.join(fv.workdir, plan.task, variant.name)
    steps, spent = plan.steps, os.path.join(workdir, BUDGET_SPENT)
    if os.path.exists(spent):  # the run stopped at its time limit before: a rerun only scores it again
        with open(spent) as f:
            steps = json.load(f)["steps"]
        print(f"{workdir} stopped at its time limit (step {steps}) before; scoring it as it is (delete the directory "
              "to train it again).", flush=True)
    return TrainOptions(workdir=workdir, steps=steps, schedule_steps=plan.steps, learning_rate=fv.learning_rate,
                        optimizer="adamw", batch_size=plan.batch_size, seq_len=plan.seq_len, dataset=plan.dataset,
                        data_path=plan.data_path, seed=fv.seed, eval_every=plan.eval_every, eval_batches=2,
                        checkpoint_every=plan.eval_every, sample_len=0, analyze_memory=False,
                        time_limit_minutes=fv.budget_minutes)


def learning_curve(workdir: str) -> List[Dict[str, float]]:
    """metrics.jsonl as curve points: step, training wall minutes (sum of step times, compilation included), train
    loss and bits, and the validation scores where an evaluation ran."""
    from reformer_jax.plot import read_metrics

    points, minutes = [], 0.0
    for row in read_metrics(workdir):
        minutes += row["step_seconds"] / 60
        points.append({"step": row["step"], "minutes": minutes, "loss": row["loss"], "bpc": row["bpc"],
                       "accuracy": row.get("accuracy"),
                       **{k: row[k] for k in ("val_loss", "val_bpc", "val_accuracy") if k in row}})
    return points


def _with_attention(config, kind: str, **changes):
    """`config` with its full / LSH layers switched to `kind` ("full" or "lsh"); a mixed stack keeps its local
    layers."""
    if config.attn_layers is None:
        return config.replace(attention=kind, **changes)
    return config.replace(attn_layers=tuple(t if t == "local" else kind for t in config.attn_layers), **changes)


def _eval_params(config, params):
    """`params` as a model of `config` names them: a mixed stack keeps its attention parameters by layer type,
    so evaluating its LSH layers as full attention renames them (full and LSH layers share one layout)."""
    if config.attn_layers is None:
        return params
    kind = "full" if "full" in config.attn_layers else "lsh"
    attention = {(kind if t in ("full", "lsh") else t): p for t, p in params["layers"]["attention"].items()}
    return {**params, "layers": {**params["layers"], "attention": attention}}


def _eval_configs(fv, config) -> List[Tuple[str, Any]]:
    """(column name, config) of every evaluation setting: full attention, then LSH at each --eval_hashes."""
    return [("full", _with_attention(config, "full"))] + [(f"lsh-{h}", _with_attention(config, "lsh", n_hashes=h))
                                                            for h in cli.int_list("eval_hashes", fv.eval_hashes, "1")]


def score_model(fv, plan: TaskPlan, variant: Variant, params, dataset) -> Dict[str, Any]:
    """Every final score of one trained model (see the module docstring)."""
    import jax

    from reformer_jax.training import evaluation
    from reformer_jax.training.step_builder import build_train_step

    def scores(config, params):  # batch i hashed with fold_in(rng, i): every configuration sees the same keys
        return evaluation.evaluate_batches(build_train_step(config).evaluate, params, batches,
                                           lambda i: jax.random.fold_in(rng, i))

    config, rng = variant.config(), jax.random.key(fv.seed + 30_000)
    # The same validation windows for every model and every evaluation setting.
    batches = [dataset.batch("validation", fv.seed, 1000 + i, plan.batch_size, plan.seq_len)
               for i in range(fv.eval_batches)]
    result: Dict[str, Any] = {"eval_tokens": int(sum(b["weights"].sum() for b in batches))}
    settings = _eval_configs(fv, config)
    result["by_eval_setting"] = {name: scores(c, _eval_params(c, params)) for name, c in settings}
    # The as-trained score is one of the settings (the same config, batches and keys) unless --eval_hashes skips it.
    trained = next((name for name, c in settings if c == config), None)
    result["final"] = result["by_eval_setting"][trained] if trained else scores(config, params)
    if plan.task == "shakespeare":
        n = fv.influence_sequences
        first, other = (dataset.batch("validation", fv.seed, 2000 + i, n, plan.seq_len) for i in (0, 1))
        result["future_influence"] = evaluation.future_influence(
            config, params, first["inputs"], first["targets"], other["inputs"], plan.seq_len // 2, rng)
        positions = evaluation.sample_positions(plan.seq_len, fv.honest_positions, n, fv.seed)
        result["future_masked"] = evaluation.honest_bpc(config, params, first["inputs"], first["targets"], positions,
                                                        rng)
    return result


def run_variant(fv, plan: TaskPlan, variant: Variant, dataset) -> Row:
    """Train (or resume) one variant, then score it; the row of the results JSON."""
    from reformer_jax.training.loop import train_and_evaluate

    options = _options(fv, plan, variant)
    print(f"\n[{plan.task}] {variant.name}: {plan.steps} steps of {plan.batch_size} x {plan.seq_len} tokens, "
          f"budget {fv.budget_minutes:g} min -> {options.workdir}", flush=True)
    summary = train_and_evaluate(variant.config(), options, dataset=dataset)
    if summary["stopped_by_time_limit"]:
        output.atomic_write_text(os.path.join(options.workdir, BUDGET_SPENT), json.dumps({"steps": summary["steps"]}))
    started = time.perf_counter()
    scores = score_model(fv, plan, variant, summary["state"].params, dataset)
    curve = learning_curve(options.workdir)
    row: Row = {"task": plan.task, "variant": variant.name, "preset": variant.preset, "n_hashes": variant.n_hashes,
                "steps": summary["steps"], "steps_planned": plan.steps,
                "stopped_by_time_limit": summary["steps"] < plan.steps,
                "train_minutes": curve[-1]["minutes"] if curve else None, "budget_minutes": fv.budget_minutes,
                "tokens_per_step": plan.batch_size * plan.seq_len, "final_train_loss": summary.get("train_loss"),
                **scores, "scoring_seconds": time.perf_counter() - started, "curve": curve,
                "config": variant.config().to_dict(), "optimizer": "adamw", "learning_rate": fv.learning_rate}
    final, line = row["final"], f"{row['steps']} steps in {row['train_minutes']:.1f} min; "
    if plan.task == "synthetic":
        line += "copied-half accuracy " + ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in row["by_eval_setting"].items())
    else:
        masked = row["future_masked"]
        line += (f"validation {final['bpc']:.3f} bpc; future masked {masked['truncated_bpc']:.3f} vs {masked['bpc']:.3f}"
                 f" bpc at the same {masked['positions']} positions; future influence mean |d log p| "
                 f"{row['future_influence']['mean_abs_delta_nats']:.2e} nats")
    print(f"[{plan.task}] {variant.name}: {line}", flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def markdown(plan_task: str, rows: Sequence[Row], machine: Dict[str, Any], command: str) -> str:
    """The task's tables: final scores, then trained x evaluated attention."""
    heads = sorted({(r["config"]["reversible"], r["config"]["output_head"], r["config"]["tie_embeddings"])
                    for r in rows})
    words = {("mean", True): "tied to the token embedding", ("mean", False): "an untied projection",
             ("concat", False): "an untied projection of both streams concatenated"}
    lines = [f"# Quality: {plan_task}\n", f"Command: `{command}`. Machine: {machine['platform']}, "
             f"{machine['cpu_count']} CPUs, backend {machine['backend']}; jax {machine['jax_version']}, jaxlib "
             f"{machine['jaxlib_version']}. Same seed, data order and {rows[0]['steps_planned']} planned steps for "
             f"every model; budget {rows[0]['budget_minutes']:g} min of wall time each (compilation included). "
             "Output heads: " + "; ".join(f"{'reversible' if rev else 'other'} models {words[(head, tied)]}"
                                          for rev, head, tied in heads) + ".\n"]
    columns = [("variant", "model", ""), ("steps", "steps", "d"), ("train_minutes", "train min", ".1f")]
    if plan_task == "shakespeare":
        columns += [(lambda r: r["final"]["bpc"], f"val bpc ({rows[0]['eval_tokens']:,} tokens)", ".3f"),
                    (lambda r: r["future_masked"]["bpc"], "bpc at sampled positions", ".3f"),
                    (lambda r: r["future_masked"]["truncated_bpc"], "same, future masked", ".3f"),
                    (lambda r: r["future_influence"]["mean_abs_delta_nats"],
                     "future influence mean |d log p| (nats)", ".2e"),
                    (lambda r: r["future_influence"]["mean_delta_bpc"], "future influence mean d bpc", "+.4f")]
        key, spec, caption = "bpc", ".3f", "Validation bits per character by the attention used at evaluation (rows: " \
                                           "as trained):"
    else:
        columns += [(lambda r: r["final"]["accuracy"], "copied-half accuracy (as trained)", ".1%")]
        key, spec, caption = "accuracy", ".1%", ("Copied-half accuracy by the attention used at evaluation (rows: as "
                                                 "trained; the paper's Table 2):")
    settings = list(dict.fromkeys(k for r in rows for k in r["by_eval_setting"]))
    lines += [output.markdown_table(rows, columns), f"\n{caption}\n", output.markdown_table(rows, [
        ("variant", "trained", "")] + [(lambda r, s=s: r["by_eval_setting"].get(s, {}).get(key), f"eval {s}", spec)
                                       for s in settings])]
    return "\n".join(lines)


def run_seed(row: Row) -> int:
    """The --seed a row was trained with (0 when its command does not set it)."""
    match = re.search(r"--seed=(\d+)", row.get("command", ""))
    return int(match.group(1)) if match else 0


def seed_spread(runs: Sequence[Sequence[Row]]) -> str:
    """Markdown: the validation bpc of the models every run trained, one column per seed, and each model's gap to
    the Transformer per seed with its mean and range. `runs` are the shakespeare rows of runs with other --seed
    values (the same sizes and steps); the gap is judged against the 3% target seed by seed."""
    by_seed = {run_seed(rows[0]): {r["variant"]: r for r in rows} for rows in runs if rows}
    seeds = sorted(by_seed)
    models = [m for m in by_seed[seeds[0]] if all(m in by_seed[s] for s in seeds)]
    if "transformer" not in models or len(seeds) < 2:
        return ""
    lines = ["| model | " + " | ".join(f"seed {s}: bpc | seed {s}: gap" for s in seeds) + " | gap: mean (range) |",
             "| --- | " + " | ".join("---: | ---:" for _ in seeds) + " | ---: |"]
    for m in models:
        bpc = [by_seed[s][m]["final"]["bpc"] for s in seeds]
        gaps = [b / by_seed[s]["transformer"]["final"]["bpc"] - 1 for b, s in zip(bpc, seeds)]
        summary = "" if m == "transformer" else f"{statistics.mean(gaps):+.1%} ({min(gaps):+.1%} to {max(gaps):+.1%})"
        lines.append(f"| {m} | " + " | ".join(f"{b:.3f} | {g:+.1%}" for b, g in zip(bpc, gaps)) + f" | {summary} |")
    steps = sorted({by_seed[s][m]["steps"] for s in seeds for m in models})
    return (f"Validation bpc ({', '.join(map(str, steps))} steps) of the same models trained with other seeds "
            "(parameters, data order, hashing); gap = bpc / the Transformer's of the same seed - 1:\n\n"
            + "\n".join(lines) + "\n")


def plot_curves(axes, task: str, rows: Sequence[Row]) -> None:
    """Validation (and training) curves against step and against wall minutes."""
    metric = "val_bpc" if task == "shakespeare" else "val_accuracy"
    label = "validation bits per character" if task == "shakespeare" else "validation copied-half accuracy"
    for row in rows:
        points = [p for p in row["curve"] if metric in p]
        for ax, x in zip(axes, ("step", "minutes")):
            line, = ax.plot([p[x] for p in points], [p[metric] for p in points], marker="o", markersize=3,
                            label=row["variant"])
            if task == "shakespeare":
                ax.plot([p[x] for p in row["curve"]], [p["bpc"] for p in row["curve"]], color=line.get_color(),
                        alpha=0.25, linewidth=0.8)
    for ax, x in zip(axes, ("optimizer step", "training wall time (min, compilation included)")):
        output.finish(ax, xlabel=x, ylabel=label, grid={})
    if task == "shakespeare":
        axes[0].set_ylim(top=min(8.5, axes[0].get_ylim()[1]))
        axes[1].set_ylim(axes[0].get_ylim())
    axes[0].legend()
    axes[0].set_title(f"{task}: faint lines = training batches" if task == "shakespeare" else task)


def run_task(fv, plan: TaskPlan, command: str, git_commit: Optional[str]) -> List[Row]:
    from reformer_jax.training import data as data_lib

    dataset = data_lib.load_dataset(plan.dataset, seq_len=plan.seq_len, data_path=plan.data_path,
                                    vocab_size=plan.vocab_size)
    rows = [run_variant(fv, plan, variant, dataset) for variant in plan.variants]
    info = {**output.machine(), "git_commit": git_commit}
    for row in rows:
        row.update(command=command, **info)
    for path in output.write_outputs(fv.out_dir, f"quality_{plan.task}", rows, markdown(plan.task, rows, info, command),
                                     lambda axes: plot_curves(axes, plan.task, rows), (12.0, 4.6, 2)):
        print(f"wrote {path}")
    return rows


def run(plans: Sequence[TaskPlan]) -> None:
    from absl import logging

    from reformer_jax.training import data as data_lib
    from reformer_jax.training.checkpoint import CheckpointError, CheckpointMismatch

    logging.set_verbosity(logging.WARNING)
    command, git_commit = cli.command("benchmarks.quality", sys.argv), cli.git_commit()  # the commit read now
    try:
        for plan in plans:
            run_task(flags.FLAGS, plan, command, git_commit)
    except (data_lib.DataError, CheckpointMismatch, CheckpointError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    define_flags()
    cli.main(lambda fv, argv: check_flags(fv), run)
