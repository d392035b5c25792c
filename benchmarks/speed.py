"""Training-speed benchmark driver: our step, the PyTorch Reformers beside it, and length sweeps.

    python -m benchmarks.speed                                   # ours at configuration P, every --ours setting
    python -m benchmarks.speed --compare=peers                   # + Hugging Face and reformer-pytorch, same run
    python -m benchmarks.speed --sweep=length                    # four variants, lengths 1024 .. 65536
    python -m benchmarks.speed --profile --ours=default          # where our step's time goes (one trace)
    python -m benchmarks.speed --compilation_cache_dir=~/.cache/reformer_jax/xla   # reuse compiled steps

Each implementation is a worker process of its own (`benchmarks.speed_worker`: its peak RSS is its own), started
one after the other (compilations never overlap) and kept alive while the driver alternates timing rounds between
them, so drift of a shared machine hits all alike; the figure is the median step. Sizes: configuration P
(`reformer_jax.model.sizes.SPEED_P`), dropout 0, absolute positions, as the peers run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import flags

from benchmarks import cli, output, peers, seed
from benchmarks.cli import DEFAULT_OUT_DIR, FlagError, log
from benchmarks.output import MIB, Row
from reformer_jax.model.config import POS_EMBEDDINGS, PRESETS
from reformer_jax.model.sizes import SPEED_P

# Settings of our step timed side by side: (ModelConfig overrides, how it is compiled, what it is). Compiled with
# the steps' own options unless "lean" (main.py --lean_compile) or "xla" (no options: XLA's defaults); "tensor2"
# runs over two host devices with the heads split (main.py --host_devices=2 --mesh=tensor:2).
OURS_SETTINGS = {
    "default": ({}, "", "one device, hash rounds and heads one at a time, compiled with the steps' options (on "
                "CPU: YNNPACK fusions off)"),
    "all_at_once": ({"sequential_rounds": False, "sequential_heads": False}, "",
                    "all hash rounds and heads at once (sequential_rounds and sequential_heads off)"),
    "rounds_only": ({"sequential_heads": False}, "", "hash rounds one at a time, heads all at once"),
    "bfloat16": ({"dtype": "bfloat16"}, "", "the default with bfloat16 compute (float32 parameters and residual "
                 "streams)"),
    "lean_compile": ({}, "lean", "the default, compiled also without XLA:CPU's fusion emitters (main.py "
                     "--lean_compile)"),
    "xla_defaults": ({}, "xla", "the default compiled with XLA's own default options (on CPU: YNNPACK fusions on)"),
    "tensor2": ({}, "", "the default on two host devices, heads split over them (main.py --host_devices=2 "
                "--mesh=tensor:2)")}
SETTING_NOTES = {name: note for name, (_, _, note) in OURS_SETTINGS.items()}
MESH_SETTINGS = {"tensor2": ("tensor:2", 2)}  # (main.py's --mesh, --host_devices)
SPEED_COLUMNS = [
    ("label", "implementation", "s"), ("median_step_s", "s / step", ".3f"), ("tokens_per_s", "tokens / s", ",.0f"),
    ("hf_over_this_step", "speed-up over HF", ".2f"), ("peak_rss_bytes", "peak RSS MiB", "mib"),
    ("rss_over_hf", "RSS / HF", ".2f"), ("step_gflop", "GFLOP / step", ",.1f"), ("gflops_per_s", "GFLOP/s", ".1f"),
    ("roofline_fraction", "of matmul rate", ".2f"), ("compile_s", "compile s", ".1f"),
    (lambda r: r["warmup_s"][0] if r.get("warmup_s") else None, "first step s", ".2f"),
    ("timed_steps", "timed steps", "")]
LENGTH_COLUMNS = [
    ("label", "variant", "s"), ("seq_len", "length", ""), ("median_step_s", "s / step", ".3f"),
    (lambda r: r["s_per_token"] * 1e6 if r["s_per_token"] else None, "µs / token", ",.1f"),
    ("s_per_token_over_shortest", "per-token cost / shortest", ".2f"), ("gflops_per_s", "GFLOP/s", ".1f"),
    ("compile_peak_bytes", "compile-time peak MiB", "mib"), ("peak_rss_bytes", "peak RSS MiB", "mib"),
    ("compile_s", "compile s", ".1f"), ("skipped", "skipped", "")]


@dataclasses.dataclass(frozen=True)
class Settings(cli.sized(SPEED_P)):
    """One run of the driver: what it times and how; a flag per field.

    Attributes:
      out_dir: Where speed*.json/.csv/.md/.png are written.
      compare: peers: also time Hugging Face's ReformerModelWithLMHead and reformer_pytorch.ReformerLM (each when
        installed) at the same sizes.
      sweep: length: the presets in --models at --lengths, one length after the other, seconds per token;
        linearity: each preset in --models at every --lengths in the same timing rounds (all alive at once).
      model: Our preset timed without --sweep.
      ours: Settings of our step timed side by side (benchmarks.speed.OURS_SETTINGS; tensor2 is main.py's default
        on a CPU host with two or more cores). The sweeps time the first.
      seq_len: Sequence length.
      batch_size: Batch size.
      dropout: Dropout of our blocks (0, as the peers are run).
      pos_embedding: Our positional embedding: absolute (as the peers are run) or axial.
      models: Presets of --sweep=length and --sweep=linearity.
      lengths: Lengths of --sweep=length and --sweep=linearity.
      warmup_steps: Untimed steps after compiling.
      rounds: Timing rounds (alternating between implementations).
      steps_per_round: Timed steps per implementation per round.
      sweep_rounds: Timing rounds per length in --sweep=length and --sweep=linearity.
      merge: --sweep=length: keep the rows of OUT_DIR/speed_length.json for the (preset, length) pairs this run
        does not time (each row records its own command).
      memory_fraction: A sweep skips a step (and the variant's longer ones) whose compile-time peak exceeds what
        the steps already running leave of this fraction of the machine's RAM.
      compilation_cache_dir: JAX persistent compilation cache directory (empty: off).
      fast_compile: LLVM -O0: faster compiles, slower steps (for tests only, never for reported figures).
      torch_threads: torch.set_num_threads for the peers (0: torch's default).
      profile: Instead of timing rounds: trace --profile_steps steps of each --ours setting and sort the ops' time
        by kind (benchmarks.step_profile) -> speed_profile.*.
      profile_steps: --profile: steps timed untraced and then traced.
    """

    out_dir: str = DEFAULT_OUT_DIR
    compare: str = "none"
    sweep: str = "none"
    model: str = "reformer"
    ours: Tuple[str, ...] = ("default", "tensor2", "all_at_once", "lean_compile", "bfloat16", "xla_defaults")
    dropout: float = 0.0
    pos_embedding: str = "absolute"
    models: Tuple[str, ...] = PRESETS
    lengths: Tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    warmup_steps: int = 1
    rounds: int = 5
    steps_per_round: int = 1
    sweep_rounds: int = 2
    merge: bool = False
    memory_fraction: float = 0.7
    compilation_cache_dir: str = ""
    fast_compile: bool = False
    torch_threads: int = 0
    profile: bool = False
    profile_steps: int = 2
    command: str = "python -m benchmarks.speed"

    def config(self, model: str, seq_len: int, setting: str = "default"):
        """Our preset at these sizes (max_len = the row's length), with one of OURS_SETTINGS applied."""
        from reformer_jax import ModelConfig

        return ModelConfig.preset(model, **{**self.model_fields(), "max_len": seq_len}, dropout=self.dropout,
                                  pos_embedding=self.pos_embedding, **OURS_SETTINGS[setting][0])

    def peer_sizes(self, seq_len: int) -> Dict[str, Any]:
        """The sizes a peer builds (benchmarks.peers), from our reformer preset at this length. The feed-forward
        chunk is ours (capped at the length), or 0 (off) where it does not divide the length: Hugging Face refuses
        a ragged last chunk."""
        config = self.config("reformer", seq_len)
        ff_chunk = min(config.ff_chunk_len, seq_len)
        return {**{k: getattr(self, k) for k in ("vocab_size", "d_model", "n_heads")}, "d_head": config.d_head,
                **{k: getattr(self, k) for k in ("d_ff", "n_layers")}, "seq_len": seq_len,
                **{k: getattr(self, k) for k in ("batch_size", "n_hashes", "chunk_len")},
                "n_buckets": config.resolved_n_buckets(seq_len),
                "ff_chunk_len": ff_chunk if ff_chunk and seq_len % ff_chunk == 0 else 0}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    cli.define_flags(Settings, flag_values)


def settings_from_flags(fv: flags.FlagValues = flags.FLAGS, argv: Optional[Sequence[str]] = None) -> Settings:
    """Validated Settings; raises FlagError (naming the flag, the value and what would work) before compiling."""
    s = cli.settings_from_flags(
        Settings, fv, "benchmarks.speed", argv,
        choices={"compare": ("none", "peers"), "sweep": ("none", "length", "linearity"), "model": PRESETS,
                 "pos_embedding": POS_EMBEDDINGS, "ours": tuple(OURS_SETTINGS), "models": PRESETS},
        minimum={"warmup_steps": 0, "torch_threads": 0}, parse={"compilation_cache_dir": cli.cache_dir})
    if not 0 < s.memory_fraction <= 1:
        raise FlagError(f"--memory_fraction={s.memory_fraction} is invalid: expected a fraction in (0, 1].")
    if not 0 <= s.dropout < 1:
        raise FlagError(f"--dropout={s.dropout} is invalid: expected a rate in [0, 1).")
    if s.merge and s.sweep != "length":
        raise FlagError(f"--merge keeps rows of a --sweep=length run; it does nothing with --sweep={s.sweep}.")
    if s.compare != "none" and s.sweep != "none":
        raise FlagError(f"--compare={s.compare} and --sweep={s.sweep} are separate runs; give one of them.")
    if s.profile and (s.compare != "none" or s.sweep != "none"):
        raise FlagError(f"--profile profiles our step alone; drop --compare={s.compare} / --sweep={s.sweep} (the "
                        "peers' steps are not XLA programs).")
    lengths, models = (s.lengths, s.models) if s.sweep != "none" else ((s.seq_len,), (s.model,))
    cli.check_lengths(s.chunk_len, **{"lengths" if s.sweep != "none" else "seq_len": lengths})
    cli.check_model(lambda: [s.config(model, length, setting).check_seq_len(length)  # every configuration run
                             for length in lengths for model in models for setting in s.ours])
    if s.compare == "peers" and s.d_ff % s.d_model:
        raise FlagError(f"--d_ff={s.d_ff} must be a multiple of --d_model={s.d_model} for reformer_pytorch "
                        f"(its ff_mult); e.g. --d_ff={4 * s.d_model}.")
    return s


# ----------------------------------------------------------------------------------------------------------------
# Workers


class Worker:
    """One implementation's worker process (benchmarks.speed_worker) and the step times it reported."""

    def __init__(self, name: str, spec: Dict[str, Any]):
        self.name, self.spec, self.proc = name, spec, None
        self.step_s: List[float] = []
        self.facts: Dict[str, Any] = {}
        self.skipped: Optional[str] = None

    def start(self) -> None:
        """Launch the process (it compiles and warms up at once)."""
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.speed_worker", json.dumps(self.spec)],
                                     cwd=cli.REPO_ROOT, env=cli.worker_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)

    def read(self, *kinds: str) -> Tuple[str, Dict[str, Any]]:
        """The next message of one of these kinds (other lines on stdout, e.g. library warnings, are skipped)."""
        from benchmarks.speed_worker import parse_line

        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self._stderr.seek(0)
                raise RuntimeError(f"speed worker {self.name} ended (exit {self.proc.returncode}) before sending "
                                   f"{'/'.join(kinds)}; its stderr ended with:\n{self._stderr.read()[-3000:]}")
            try:
                kind, payload = parse_line(line)
            except ValueError:
                continue
            if kind == "ERROR":
                raise RuntimeError(f"speed worker {self.name}: {payload['message']}")
            if kind in kinds:
                return kind, payload

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait_ready(self) -> None:
        self.start()
        kind, payload = self.read("READY", "SKIP")
        self.facts.update(payload)
        if kind == "SKIP":
            self.skipped = payload["reason"]
            self.proc.wait()

    def run_round(self, steps: int) -> None:
        self.send(f"run {steps}")
        _, payload = self.read("TIMES")
        self.step_s.extend(payload["step_s"])
        self.facts["last_loss"] = payload["loss"]

    def finish(self) -> None:
        if self.skipped is None:
            self.send("quit")
            self.facts.update(self.read("DONE")[1])
            self.proc.wait()
        self._stderr.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def time_group(workers: List[Worker], settings: Settings, rounds: int,
               memory_budget: Optional[int] = None) -> Tuple[float, float]:
    """Start each worker in turn (compiles never overlap), then alternate timing rounds, then collect RSS; returns
    the 1-minute load average before and after. With `memory_budget`, each worker may use what the compile-time
    peaks of the workers already alive leave of it."""
    load_before = os.getloadavg()[0]
    try:
        alive = []
        for worker in workers:
            if memory_budget is not None:
                worker.spec["memory_limit_bytes"] = memory_budget - sum(w.facts["compile_peak_bytes"] for w in alive)
            log(f"  {worker.name}: building and warming up ...")
            worker.wait_ready()
            if worker.skipped:
                log(f"  {worker.name}: skipped ({worker.skipped})")
                continue
            log(f"  {worker.name}: ready (compile {worker.facts.get('compile_s')} s, warm-up "
                f"{worker.facts.get('warmup_s')} s)")
            alive.append(worker)
        for r in range(rounds):
            order = alive[r % len(alive):] + alive[:r % len(alive)] if alive else []
            for worker in order:
                worker.run_round(settings.steps_per_round)
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{w.name} {w.step_s[-1]:.3f} s" for w in order))
        for worker in workers:
            worker.finish()
    finally:
        for worker in workers:
            worker.kill()
    return load_before, os.getloadavg()[0]


def ours_spec(settings: Settings, model: str, seq_len: int, setting: str,
              memory_limit: Optional[int] = None) -> Dict[str, Any]:
    """A worker's spec of our step: the config and the XLA options it is compiled with."""
    import jax

    from reformer_jax.xla.compiler_options import step_compiler_options

    compiled_as = OURS_SETTINGS[setting][1]
    options = {} if compiled_as == "xla" else step_compiler_options(jax.default_backend(), lean=compiled_as == "lean")
    mesh, host_devices = MESH_SETTINGS.get(setting, (None, None))
    return {"impl": "ours", "config": settings.config(model, seq_len, setting).to_dict(), "mesh": mesh,
            "host_devices": host_devices, "sizes": {"vocab_size": settings.vocab_size},
            "batch_size": settings.batch_size, "seq_len": seq_len, "warmup_steps": settings.warmup_steps,
            "memory_limit_bytes": memory_limit, "compilation_cache_dir": settings.compilation_cache_dir or None,
            "compiler_options": {**options, **({"xla_backend_optimization_level": 0} if settings.fast_compile else {})}}


def peer_spec(settings: Settings, peer: str, seq_len: int) -> Dict[str, Any]:
    return {"impl": peer, "sizes": settings.peer_sizes(seq_len), "batch_size": settings.batch_size,
            "seq_len": seq_len, "warmup_steps": settings.warmup_steps, "torch_threads": settings.torch_threads}


def make_row(settings: Settings, experiment: str, worker: Worker, *, implementation: str, label: str,
             model: str, seq_len: int, load: Tuple[float, float], probes: Sequence[Row] = ()) -> Row:
    from reformer_jax.model import flops
    from reformer_jax.model.hf_convert import config_from_fields
    from reformer_jax.xla import matmul_rate

    median = statistics.median(worker.step_s) if worker.step_s else None
    tokens, rss = settings.batch_size * seq_len, worker.facts.get("ru_maxrss_bytes")
    row: Row = {
        "experiment": experiment, "implementation": implementation, "label": label, "model": model,
        "seq_len": seq_len, **{k: getattr(settings, k) for k in ("batch_size", "vocab_size", "d_model", "n_heads",
                                                                 "d_ff", "n_layers", "n_hashes", "chunk_len")},
        "config": worker.spec.get("config") or worker.spec.get("sizes"),
        "compiler_options": worker.spec.get("compiler_options"),
        "median_step_s": median, "tokens_per_s": tokens / median if median else None,
        "s_per_token": median / tokens if median else None, "step_s": worker.step_s,
        "timed_steps": len(worker.step_s), "skipped": worker.skipped, "peak_rss_bytes": rss,
        "peak_rss_mib": round(rss / MIB, 1) if rss else None, "loadavg_before": load[0], "loadavg_after": load[1]}
    row.update({k: v for k, v in worker.facts.items() if k not in ("ru_maxrss_bytes", "pid")})
    # The model's FLOPs (the peers run the same model): with the run's dense matmul rate, where it measured one.
    config = config_from_fields(worker.spec["config"]) if "config" in worker.spec else settings.config(model, seq_len)
    row.update(flops.achieved(flops.train_step_flops(config, settings.batch_size, seq_len), median,
                              matmul_rate.attainable_rate([p for p in probes if p["dtype"] == config.dtype])),
               matmul_probes=list(probes) or None)
    return output.stamp(row, settings.command)


def command_text(rows: Sequence[Row]) -> str:
    """"Command: `...`", or every distinct command where rows come from several runs (--merge)."""
    commands = list(dict.fromkeys(r.get("command", "") for r in rows))
    if len(commands) <= 1:
        return f"Command: `{commands[0] if commands else ''}`"
    return "Commands (each row records its own): " + "; ".join(f"`{c}`" for c in commands)


def _header(rows: List[Row], title: str) -> str:
    first = rows[0] if rows else {}
    versions = ", ".join(f"{k.replace('_version', '')} {first.get(k) or next((r[k] for r in rows if r.get(k)), '')}"
                         for k in ("jax_version", "jaxlib_version", "torch_version", "transformers_version",
                                   "reformer_pytorch_version") if any(r.get(k) for r in rows))
    loads = [r[k] for r in rows for k in ("loadavg_before", "loadavg_after") if r.get(k) is not None]
    return (f"# {title}\n\n{command_text(rows)}. Machine: {first.get('platform', '')}, "
            f"{first.get('cpu_count', '')} CPUs, backend {first.get('backend', '')}; {versions}. 1-minute load "
            f"average during the run {min(loads, default=0):.1f} to {max(loads, default=0):.1f} (a loaded shared "
            f"machine makes the figures noisy). Median of the timed steps, compile and warm-up excluded; peak RSS "
            f"is each implementation's own process (ru_maxrss, compilation included).\n\n")


# ----------------------------------------------------------------------------------------------------------------
# Runs


def matmul_probes(settings: Settings) -> List[Row]:
    """This machine's dense matmul rate at the step's shapes (`flops.dense_matmul_shapes`), in each compute dtype
    of --ours, compiled with the steps' options and with XLA's own; measured after the timing rounds."""
    import jax

    from reformer_jax.model import flops
    from reformer_jax.xla import matmul_rate
    from reformer_jax.xla.compiler_options import step_compiler_options

    configs = {c.dtype: c for c in (settings.config(settings.model, settings.seq_len, o) for o in settings.ours)}
    log(f"== dense matmul rate at the step's shapes ({', '.join(configs)}) ==")
    return [p for dtype, c in configs.items() for p in matmul_rate.probe_matmuls(
        flops.dense_matmul_shapes(c, settings.batch_size, settings.seq_len), dtype,
        {"step": step_compiler_options(jax.default_backend()), "xla": {}})]


def roofline_text(probes: Sequence[Row]) -> str:
    """How the FLOP/s columns are made, with the dense matmul rates measured."""
    best = {}
    for p in probes:
        best[p["dtype"]] = max(best.get(p["dtype"], p), p, key=lambda q: q["flops_per_s"])
    rates = "; ".join(f"{d} {p['flops_per_s'] / 1e9:.1f} GFLOP/s ([{p['m']} x {p['k']}] x [{p['k']} x {p['n']}], "
                      f"{p['options']} options)" for d, p in best.items())
    return ("\nGFLOP / step: the model's matrix products, forward, backward (2 x forward) and the reversible "
            "stack's recomputation (`reformer_jax.model.flops`; the peers run the same model). Of matmul rate: "
            f"GFLOP/s over the best dense matmul rate measured in this run at the step's shapes: {rates}.\n")


def available_peers() -> Tuple[List[str], List[str]]:
    """(the peers installed here, a message for each one skipped)."""
    available, notes = [], []
    for peer in peers.PEERS:
        missing = peers.missing_packages(peer)
        if missing:
            notes.append(f"{peers.PEER_LABELS[peer]} skipped: {', '.join(missing)} not installed "
                         "(pip install -r benchmarks/requirements-peers.txt).")
            log(notes[-1])
        else:
            available.append(peer)
    return available, notes


def run_speed(settings: Settings) -> List[Row]:
    """Our step (each --ours setting) and, with --compare=peers, the installed peers, alternating rounds."""
    experiment = "peers" if settings.compare == "peers" else "speed"
    entries = [("ours" if s == "default" else f"ours_{s}",
                f"reformer_jax ({settings.model}{'' if s == 'default' else ', ' + s})") for s in settings.ours]
    notes: List[str] = []
    if settings.compare == "peers":
        available, notes = available_peers()
        entries.extend((peer, peers.PEER_LABELS[peer]) for peer in available)
    workers = [Worker(name, ours_spec(settings, settings.model, settings.seq_len, name[5:] or "default")
                      if name.startswith("ours") else peer_spec(settings, name, settings.seq_len))
               for name, _ in entries]
    log(f"== {experiment}: {', '.join(n for n, _ in entries)} at length {settings.seq_len}, {settings.rounds} "
        f"rounds ==")
    load_before, _ = time_group(workers, settings, settings.rounds)
    probes = matmul_probes(settings)
    load = (load_before, os.getloadavg()[0])  # the probes included: the load over the whole run
    rows = [make_row(settings, experiment, w, implementation=name, label=label, model=settings.model,
                     seq_len=settings.seq_len, load=load, probes=probes) for (name, label), w in zip(entries, workers)]
    reference = next((r for r in rows if r["implementation"] == "hf" and r["median_step_s"]), None)
    for row in rows:
        row["hf_over_this_step"] = (reference["median_step_s"] / row["median_step_s"]
                                    if reference and row["median_step_s"] else None)
        row["rss_over_hf"] = (row["peak_rss_bytes"] / reference["peak_rss_bytes"]
                              if reference and row["peak_rss_bytes"] else None)
    s = settings
    md = (_header(rows, "Training speed: reformer_jax" + (" against the PyTorch Reformers" if experiment == "peers"
                                                          else ""))
          + f"Sizes: vocab {s.vocab_size}, d_model {s.d_model}, {s.n_heads} heads, d_ff {s.d_ff}, {s.n_layers} "
            f"layers, length {s.seq_len}, batch {s.batch_size}, {s.n_hashes} hash rounds, chunk {s.chunk_len}, "
            f"dropout {s.dropout}, float32 parameters, Adafactor.\n\n"
          + "Our settings: " + "; ".join(f"{setting}: {SETTING_NOTES[setting]}" for setting in s.ours) + ".\n\n"
          + output.markdown_table(rows, SPEED_COLUMNS) + "".join(f"\n{n}\n" for n in notes) + roofline_text(probes))

    def draw(axes):
        ax1, ax2 = axes
        names = [r["label"].replace(" (", "\n(") for r in rows]
        ax1.barh(names, [r["median_step_s"] or 0 for r in rows], color="tab:blue")
        ax1.set_xlabel("seconds per training step (median)")
        ax2.barh(names, [(r["peak_rss_bytes"] or 0) / MIB for r in rows], color="tab:orange")
        ax2.set_xlabel("peak process RSS (MiB, compilation included)")
        ax2.set_yticks([])
        for ax in (ax1, ax2):
            ax.grid(axis="x", alpha=0.3)
            ax.invert_yaxis()
        ax1.figure.suptitle(f"Training step at length {s.seq_len} ({rows[0]['backend'] if rows else ''})", fontsize=10)

    output.write_outputs(s.out_dir, output.backend_name("speed_peers" if experiment == "peers" else "speed"), rows, md,
                         draw, (11, 4.2, 2))
    return rows


def run_length_sweep(settings: Settings) -> List[Row]:
    """--sweep=length: the presets in --models at each length in turn (alternating rounds), each until it no longer
    fits in memory. --sweep=linearity: each preset at every --lengths, all workers alive and timed in the same
    alternating rounds, so a ratio between lengths is free of the machine's drift over the minutes between them
    (target 3, `targets.linearity_target_lines`)."""
    import psutil

    budget = int(psutil.virtual_memory().total * settings.memory_fraction)
    linearity = settings.sweep == "linearity"
    # Shortest first in one group (linearity): the long steps' compile-time peaks are checked against what the
    # short ones leave.
    groups = [sorted(settings.lengths)] if linearity else [[length] for length in settings.lengths]
    stopped: Dict[str, str] = {}
    last_peak: Dict[str, int] = {}
    rows: List[Row] = []
    for lengths in groups:
        # The smallest step (at the previous length) starts first, so a large one cannot crowd the others out.
        models = sorted((m for m in settings.models if m not in stopped), key=lambda m: last_peak.get(m, 0))
        if not models:
            break
        cells = [(model, length) for length in lengths for model in models]
        log(f"== {', '.join(models)} at {', '.join(map(str, lengths))}{' in the same rounds' * linearity} "
            f"(compile-time peaks together at most {budget / 2**30:.1f} GiB) ==")
        workers = [Worker(f"{m} {n}" if linearity else m, ours_spec(settings, m, n, settings.ours[0]))
                   for m, n in cells]
        load = time_group(workers, settings, settings.sweep_rounds, memory_budget=budget)
        for (model, length), worker in zip(cells, workers):
            last_peak[model] = worker.facts.get("compile_peak_bytes", 0)
            if worker.skipped:
                stopped[model] = f"stopped at length {length}: {worker.skipped}"
            rows.append(make_row(settings, settings.sweep, worker, implementation="ours", label=seed.LABELS[model],
                                 model=model, seq_len=length, load=load))
    if linearity:
        return write_length_sweep(settings, rows, name="speed_linearity",
                                  title="Training speed against length, every length in the same timing rounds")
    if settings.merge:  # keep the (preset, length) pairs this run did not time
        path, fresh = os.path.join(settings.out_dir, output.backend_name("speed_length") + ".json"), len(rows)
        rows = output.merged(path, rows, lambda r: (r["model"], r["seq_len"]))
        log(f"--merge: kept {len(rows) - fresh} rows of {path}")
    return write_length_sweep(settings, rows)


def write_length_sweep(settings: Settings, rows: List[Row], name: str = "speed_length",
                       title: str = "Training speed against length: the four variants") -> List[Row]:
    """NAME.{json,csv,md,png} in settings.out_dir from a sweep's rows (sorted, per-token ratios added)."""
    s = settings
    rows.sort(key=lambda r: (r["seq_len"], PRESETS.index(r["model"])))
    timed = [r for r in rows if r["median_step_s"]]
    for row in timed:  # per-token cost relative to the same preset at the shortest timed length
        base = min((r for r in timed if r["model"] == row["model"]), key=lambda r: r["seq_len"])
        row["s_per_token_over_shortest"] = row["s_per_token"] / base["s_per_token"]
    md = (_header(rows, title)
          + f"Sizes: d_model {s.d_model}, {s.n_heads} heads, d_ff {s.d_ff}, {s.n_layers} layers, batch "
            f"{s.batch_size}, {s.n_hashes} hash rounds, chunk {s.chunk_len}, LSH setting {s.ours[0]}. A length is "
            f"skipped (and longer ones for that variant) when its compile-time peak exceeds what the variants "
            f"already running at that length leave of the run's --memory_fraction of the machine's RAM (default "
            f"{Settings.memory_fraction:.0%}; the commands say where another was given), smallest step first.\n\n"
          + output.markdown_table(rows, LENGTH_COLUMNS))

    def draw(ax):
        for model in PRESETS:  # every preset with rows, also those a --merge run kept
            points = [(r["seq_len"], r["s_per_token"] * 1e6) for r in timed if r["model"] == model]
            if points:
                ax.plot(*zip(*points), marker="o", label=seed.LABELS[model])
        output.finish(ax, f"Seconds per token against length ({rows[0]['backend'] if rows else ''})", xlog=2, ylog=10,
                      xlabel="sequence length", ylabel="µs per token (training step)", legend={"fontsize": 8},
                      grid={"which": "both"})

    output.write_outputs(s.out_dir, output.backend_name(name), rows, md, draw, (7.5, 4.8))
    return rows


def run_profile(settings: Settings) -> List[Row]:
    """Each --ours setting's step, profiled in its own worker one after the other (benchmarks.step_profile)."""
    from benchmarks import step_profile

    rows = []
    for setting in settings.ours:
        spec = ours_spec(settings, settings.model, settings.seq_len, setting)
        worker = Worker("ours" if setting == "default" else f"ours_{setting}", spec)
        log(f"== profile: {settings.model} ({setting}) at length {settings.seq_len}, {settings.profile_steps} "
            "steps ==")
        try:
            worker.wait_ready()
            worker.send(f"profile {settings.profile_steps}")
            _, profile = worker.read("PROFILE")
            worker.finish()
        finally:
            worker.kill()
        row: Row = {"experiment": "profile", "setting": setting, "model": settings.model,
                    **{k: getattr(settings, k) for k in ("seq_len", "batch_size", "n_layers", "n_hashes",
                                                         "chunk_len")},
                    "config": spec["config"], "compiler_options": spec["compiler_options"],
                    "compile_s": worker.facts.get("compile_s"), "xla_flops": worker.facts.get("flops"), **profile}
        rows.append(output.stamp(row, settings.command))
        log(f"  {setting}: {profile['untraced_step_s']:.3f} s per step, {profile['busy_cores']:.2f} cores busy")
    first, config = rows[0], rows[0]["config"]
    md = (f"# Where the training step's time goes\n\n{command_text(rows)}. Machine: {first['platform']}, "
          f"{first['cpu_count']} CPUs, backend {first['backend']}; jax {first['jax_version']}, jaxlib "
          f"{first['jaxlib_version']}. Sizes: vocab {config['vocab_size']}, d_model {config['d_model']}, "
          f"{config['n_heads']} heads, d_ff {config['d_ff']}, {first['n_layers']} layers, length "
          f"{first['seq_len']}, batch {first['batch_size']}, {first['n_hashes']} hash rounds, chunk "
          f"{first['chunk_len']}; preset {first['model']}. Settings: "
          + "; ".join(f"{r['setting']}: {SETTING_NOTES[r['setting']]}" for r in rows) + ". The settings are "
          "profiled one after another, not in alternating rounds: compare their breakdowns, not their step times "
          "(speed_peers.md times them side by side).\n\n" + step_profile.markdown(rows))
    output.write_outputs(settings.out_dir, output.backend_name("speed_profile"), rows, md,
                         lambda ax: step_profile.plot(rows, ax), (10, 1.6 + 0.6 * len(rows)))
    return rows


def run(settings: Settings) -> List[Row]:
    os.makedirs(settings.out_dir, exist_ok=True)
    t = time.perf_counter()
    rows = (run_profile if settings.profile else run_speed if settings.sweep == "none" else run_length_sweep)(settings)
    log(f"== {len(rows)} rows in {time.perf_counter() - t:.0f} s, written to {settings.out_dir} ==")
    return rows


if __name__ == "__main__":
    define_flags()
    cli.main(settings_from_flags, run)
