"""google/reformer-enwik8's configuration at its full length: Hugging Face's forward beside ours, with memory.

    python -m benchmarks.hf_enwik8                     # 65,536 tokens -> benchmarks/results/hf_enwik8_65536.{json,md}
    python -m benchmarks.hf_enwik8 --seq_len=4096 --out_dir=/tmp/hf_enwik8          # a quick check

Random weights at the published configuration (`reformer_jax.model.sizes.HF_ENWIK8`): Hugging Face's
ReformerModelWithLMHead built with torch seed 0 and written with save_pretrained. Each side runs once, in its own
process (its peak RSS read with os.wait4): (a) Hugging Face's forward in eval mode under torch.no_grad on the first
seq_len tokens, labels = inputs (seq_len - 1 targets; use_cache=False: no generation cache); (b)
`python -m reformer_jax.convert` of the saved model, then `reformer_jax.evaluate.evaluate_run` (what
`python -m reformer_jax.evaluate --init_from --data_path --seq_len` runs) on the same text, the first seq_len + 1
bytes of the packaged tiny Shakespeare (seq_len targets); (c) that evaluation step compiled for one chip of each
--topologies slice. hash_seed is None: each side draws its own LSH rotations, so the losses agree in scale only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata

from absl import app, flags

from benchmarks import cli, output

FLAGS = flags.FLAGS


def define_flags() -> None:  # only when run: REPORT.md's builder imports this module beside other drivers
    flags.DEFINE_integer("seq_len", 65536, "Tokens of the one window scored (a multiple of 256, at most 65,536).")
    flags.DEFINE_list("topologies", "v5e:1x1,v4:1x1x1", "TPU slices whose one chip the evaluation step is compiled "
                      "for.")
    flags.DEFINE_string("out_dir", cli.DEFAULT_OUT_DIR, "Where hf_enwik8_<seq_len>.json / .md are written.")
    flags.DEFINE_enum("worker", None, ["hf", "ours", "tpu"], "Internal: run one side in this process.")
    flags.DEFINE_string("dir", None, "Internal: the working directory of the workers.")


def worker(side: str, directory: str, seq_len: int) -> dict:
    """One side, in this process; its figures as a dict (printed as JSON for the driver)."""
    text = os.path.join(directory, "text.txt")
    if side == "hf":
        import torch
        from transformers import ReformerConfig, ReformerModelWithLMHead

        from reformer_jax.model.sizes import HF_ENWIK8

        torch.manual_seed(0)
        model = ReformerModelWithLMHead(ReformerConfig(**HF_ENWIK8)).eval()
        model.save_pretrained(os.path.join(directory, "hf"))
        ids = torch.tensor([[b + 2 for b in open(text, "rb").read()[:seq_len]]])  # enwik8: byte b is token b + 2
        started = time.perf_counter()
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        return {"loss": loss, "forward_seconds": time.perf_counter() - started, "targets": seq_len - 1,
                "torch_threads": torch.get_num_threads()}
    from reformer_jax.evaluate import evaluate_run

    converted = os.path.join(directory, "converted")
    if side == "ours":
        entry = evaluate_run(converted, data_path=text, seq_len=seq_len, flag="--init_from")
        return {"loss": entry["loss"], "targets": entry["tokens"], "memory": entry["memory"],
                "seconds": entry["seconds"]}
    return {t: evaluate_run(converted, data_path=text, seq_len=seq_len, flag="--init_from", topology=t)["memory"]
            for t in FLAGS.topologies}


def run_child(argv: list, worker: bool = True) -> dict:
    """Run a command to its end: its wall seconds, peak RSS (bytes, of that process alone), exit status and (a
    worker) the figures it printed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, env={"JAX_PLATFORMS": "cpu", **os.environ})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        row = {"wall_seconds": time.perf_counter() - started, "peak_rss_bytes": usage.ru_maxrss * 1024,
               "returncode": child.returncode}
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if child.returncode != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        row["error"] = (lines[-1] if lines else f"exit status {child.returncode}")[:500]
    elif worker:
        row.update(json.loads(stdout.strip().splitlines()[-1]))
    return row


COLUMNS = [("side", "process", ""), ("wall_seconds", "wall s", ".1f"), ("compute_seconds", "run s", ".1f"),
           ("compile_seconds", "compile s", ".1f"), ("peak_rss_bytes", "peak RSS MiB", "mib"),
           ("eval_step_peak_bytes", "compile-time peak MiB", "mib"), ("loss", "loss (nats)", ".4f"),
           ("bpc", "bits / char", ".4f"), ("targets", "targets", ","), ("error", "error", "")]


def table(result: dict) -> str:
    """The processes side by side, then the evaluation step's per-chip peak on each TPU slice."""
    mib = lambda n: output.fmt(n, "mib")  # noqa: E731
    chips = "; ".join(f"{t} ({m['device_kind']}): {mib(m['eval_step_peak_bytes'])} MiB of {mib(m['hbm_bytes'])} MiB "
                      f"usable HBM, {'fits' if m['fits'] else 'does NOT fit'}" if isinstance(m, dict) else f"{t}: {m}"
                      for t, m in result["tpu"].items())
    return (output.markdown_table(result["rows"], COLUMNS)
            + "\nwall s: the whole process (imports, building or reading the model, compiling); run s: Hugging "
            "Face's forward, or our scoring of the window, compilation excluded; compile-time peak: XLA's memory "
            "analysis of our evaluation step on this CPU (argument + output - alias + temp).\n\n"
            f"The evaluation step compiled for one TPU chip (per-chip compile-time peak): {chips}.\n")


def summary(result: dict) -> str:
    """What the rows say, in a paragraph (a side that failed is named with its error)."""
    hf, _, ours = result["rows"]
    failed = [f"{row['side']} failed ({row['error']})" for row in (hf, ours) if "error" in row]
    if failed:
        return "; ".join(failed) + "."
    return (f"At {result['seq_len']:,} tokens (batch 1), Hugging Face's forward took {hf['compute_seconds']:.0f} s "
            f"and its process peaked at {hf['peak_rss_bytes'] / 2**30:.2f} GiB RSS; ours compiled in "
            f"{ours['compile_seconds']:.0f} s and scored in {ours['compute_seconds']:.0f} s "
            f"({hf['compute_seconds'] / ours['compute_seconds']:.2f} x faster, compilation excluded; "
            f"{hf['compute_seconds'] / (ours['compile_seconds'] + ours['compute_seconds']):.2f} x with it), peaking "
            f"at {ours['peak_rss_bytes'] / 2**30:.2f} GiB RSS ({ours['peak_rss_bytes'] / hf['peak_rss_bytes']:.2f} x "
            f"Hugging Face's), of which XLA's compile-time peak of the step is "
            f"{ours['eval_step_peak_bytes'] / 2**30:.2f} GiB. The losses, {hf['loss']:.4f} and {ours['loss']:.4f} nats "
            f"per target, differ by {abs(hf['loss'] - ours['loss']):.4f}: both models have the same random weights, "
            "but each side draws its own LSH rotations (hash_seed None) and Hugging Face scores one target fewer, "
            "so only their scale is comparable. The machine was shared with other jobs (1-, 5- and 15-minute load "
            f"averages {'/'.join(map(str, result['load_average']['before']))} before and "
            f"{'/'.join(map(str, result['load_average']['after']))} after, on {result['machine']['cpu_count']} "
            "CPUs): the seconds, and so their ratio, are what a busy machine gave, not an idle one's; the peak RSS "
            "figures do not depend on the load.")


def markdown(result: dict) -> str:
    return (f"# google/reformer-enwik8's configuration at {result['seq_len']:,} tokens: Hugging Face against ours\n\n"
            f"{__doc__.split(chr(10) + chr(10), 2)[2].strip()}\n\n{table(result)}\n{summary(result)}\n\n"
            f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs; "
            f"{', '.join(f'{k} {v}' for k, v in result['versions'].items())}.\nCommand: `{result['command']}`\n")


def main(argv) -> None:
    if FLAGS.worker:
        print(json.dumps(worker(FLAGS.worker, FLAGS.dir, FLAGS.seq_len)))
        return
    from reformer_jax.cli import quiet_absent_tpu

    quiet_absent_tpu()  # the CPU backend here and in the workers, where libtpu is installed without chips
    from reformer_jax.model.sizes import hf_enwik8_config
    from reformer_jax.training import data

    try:
        hf_enwik8_config().check_seq_len(FLAGS.seq_len)
    except ValueError as error:
        raise app.UsageError(f"--seq_len={FLAGS.seq_len}: {error}") from None
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="hf_enwik8.") as directory:
        with open(os.path.join(directory, "text.txt"), "wb") as f:
            f.write(data.packaged_tiny_shakespeare()[:FLAGS.seq_len + 1])
        me = [sys.executable, "-m", "benchmarks.hf_enwik8", f"--dir={directory}", f"--seq_len={FLAGS.seq_len}",
              f"--topologies={','.join(FLAGS.topologies)}"]
        cli.log(f"Hugging Face forward at {FLAGS.seq_len:,} tokens ...")
        hf = {"side": "Hugging Face forward (torch, eval, no_grad)", **run_child(me + ["--worker=hf"])}
        cli.log("convert ...")
        convert = {"side": "python -m reformer_jax.convert", **run_child([
            sys.executable, "-m", "reformer_jax.convert", f"--hf_dir={directory}/hf", f"--out={directory}/converted"],
            worker=False)}
        cli.log("ours ...")
        ours = {"side": "reformer_jax evaluate (jax, CPU)", **run_child(me + ["--worker=ours"])}
        cli.log("TPU compiles ...")
        chips = run_child(me + ["--worker=tpu"])
    hf.update(compute_seconds=hf.pop("forward_seconds", None))
    if "seconds" in ours:
        ours.update(compile_seconds=ours["seconds"]["compile"], compute_seconds=ours["seconds"]["score"],
                    eval_step_peak_bytes=ours["memory"]["eval_step_peak_bytes"])
    for row in (hf, ours):
        if row.get("loss") is not None:
            row["bpc"] = row["loss"] / math.log(2)
    result = {"seq_len": FLAGS.seq_len, "rows": [hf, convert, ours],
              "tpu": {t: chips.get(t, chips.get("error")) for t in FLAGS.topologies},
              "machine": output.machine(),
              "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
              "versions": {name: metadata.version(name) if importlib.util.find_spec(name) else None
                           for name in ("jax", "jaxlib", "libtpu", "torch", "transformers")},
              "command": cli.command("benchmarks.hf_enwik8", sys.argv), "git_commit": cli.git_commit()}
    base = os.path.join(FLAGS.out_dir, f"hf_enwik8_{FLAGS.seq_len}")
    output.atomic_write_text(base + ".json", json.dumps(result, indent=1) + "\n")
    output.atomic_write_text(base + ".md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    define_flags()
    app.run(main)
