"""REPORT.md's memory sections: the seed's experiments (variants, hash rounds, depth, Table 5, the step's live
memory, runtime against the prediction) and the memory-floor targets, from benchmarks/results/*.json."""

from __future__ import annotations

import os
from typing import Dict, List

from benchmarks import seed
from benchmarks.output import MIB, Row, markdown_table
from benchmarks.reporting.common import load, mib, slope

EXPERIMENT_FILES = ("variants", "hashes", "layers", "seqlen", "timeline", "floor", "runtime")


def sections(results: str, rel: str) -> List[str]:
    """The memory sections' lines; `rel` is the results folder as the report links it."""
    data: Dict[str, List[Row]] = {n: load(results, n) for n in EXPERIMENT_FILES}
    missing = [n for n, rows in data.items() if not rows]
    if missing:
        raise SystemExit(f"missing results for {', '.join(missing)} in {results}: run "
                         "`python -m benchmarks.memory --experiment=all` first.")
    first = data["variants"][0]
    gpu = load(results, "runtime_gpu")
    bf16 = load(os.path.join(results, "bfloat16"), "variants")
    v = {r["model"]: r for r in data["variants"]}
    out: List[str] = []
    w = out.append

    w("## How these numbers were made\n")
    commands: Dict[str, List[str]] = {}
    for name in EXPERIMENT_FILES:
        for cmd in dict.fromkeys(r["command"] for r in data[name]):
            commands.setdefault(cmd, []).append(f"{name}.json")
    if bf16:
        for cmd in dict.fromkeys(r["command"] for r in bf16):
            commands.setdefault(cmd, []).append("bfloat16/variants.json")
    w("- Commands (run from the repository root; each JSON row records the command that wrote it), then "
      "`python -m benchmarks.report` for this page:")
    for cmd, files in commands.items():
        w(f"  - `{cmd}` -> {', '.join(files)}")
    w(f"- Machine: {first['platform']}, {first['cpu_count']} CPUs, backend **{first['backend']}** "
      f"({first['device_kind']}); Python {first['python_version']}, jax {first['jax_version']}, "
      f"jaxlib {first['jaxlib_version']}.")
    w(f"- Setup (the seed's): vocabulary {first['vocab_size']}, d_model {first['d_model']}, {first['n_heads']} heads, "
      f"d_ff {first['d_ff']}, chunk {first['chunk_len']}, length {first['seq_len']}, batch {first['batch_size']}, "
      f"{first['n_layers']} layers and {v['reformer']['n_hashes']} hash rounds unless varied, optimizer "
      f"{first['optimizer']}, dtype {first['dtype']}.")
    w("- Each figure is XLA's compile-time analysis of the real training step (`jit_train_step`: loss, gradients, "
      "Adafactor update, donated state) for abstract inputs: peak = argument + output - alias + temp. "
      "'Activations' = peak - parameters - gradients - optimizer state - batch (so it includes the optimizer "
      "update's temporaries). MiB = 2^20 bytes; the seed's 'MB' are read off its charts (+-5%).")
    w("- **GPU: no results.** The runtime experiment ran on this CPU only; the GPU path (memory_stats() peak, "
      "device memory profile) is covered by unit tests with a fake stats source; "
      "`bash benchmarks/run_gpu_runtime.sh` is the prepared script for a GPU machine."
      if not gpu else "- GPU runtime results: [`runtime_gpu.json`](" + rel + "/runtime_gpu.json).")
    w("")

    # Experiment 1
    w("## Experiment 1: the four variants\n")
    w(f"![variants]({rel}/variants.png)\n")
    rows1 = [dict(r, ratio=r["peak_bytes"] / MIB / r["seed_mb"] if r.get("seed_mb") else None)
             for r in data["variants"]]
    w(markdown_table(rows1, [(lambda r: seed.LABELS[r["model"]], "model", "s"), ("seed_mb", "seed MB (fp16)", ""),
                             ("peak_bytes", "ours: peak MiB (float32)", "mib"), ("ratio", "ours / seed", ".2f"),
                             ("activation_bytes", "activations + temporaries MiB", "mib"),
                             ("param_bytes", "parameters MiB", "mib"),
                             ("optimizer_state_bytes", "Adafactor state MiB", "mib")]))
    order = sorted(v, key=lambda m: -v[m]["peak_bytes"])
    w(f"Our order: {' > '.join(seed.LABELS[m] for m in order)}. The seed's: Transformer LM > LSH LM > "
      "Reversible LM > Reformer LM.")
    w(f"The Transformer needs {v['transformer']['peak_bytes'] / v['reformer']['peak_bytes']:.1f}x the Reformer's "
      f"memory (seed: {seed.VARIANTS_MB['transformer'] / seed.VARIANTS_MB['reformer']:.1f}x).\n")
    if bf16:
        b = {r["model"]: r for r in bf16}
        w("Mixed-precision view (`--dtype=bfloat16`: blocks compute in bfloat16, parameters and residual streams "
          "stay float32):\n")
        w(markdown_table([dict(b[m], f32=v[m]["peak_bytes"]) for m in b],
                         [(lambda r: seed.LABELS[r["model"]], "model", "s"), ("f32", "float32 peak MiB", "mib"),
                          ("peak_bytes", "bfloat16 peak MiB", "mib"),
                          (lambda r: seed.VARIANTS_MB.get(r["model"]), "seed MB (fp16)", "")]))
        change = max(abs(b[m]["peak_bytes"] / v[m]["peak_bytes"] - 1) for m in b if m in v)
        w(f"bfloat16 compute changes no peak by more than {100 * change:.0f}%: the peaks are set by attention "
          "scores, softmax and the residual streams, which this implementation keeps in float32 (and by the "
          "float32 parameters, gradients and optimizer state). The seed's fp16 autocast stored these in half "
          "precision.\n")

    # Experiment 2
    h = sorted(data["hashes"], key=lambda r: r["n_hashes"])
    w("## Experiment 2: Reformer memory against hash rounds\n")
    w(f"![hashes]({rel}/hashes.png)\n")
    w(markdown_table(h, [("n_hashes", "hash rounds", ""), ("seed_mb", "seed MB", ""), ("peak_bytes", "ours MiB", "mib"),
                         (lambda r: r["peak_bytes"] / MIB / r["seed_mb"] if r.get("seed_mb") else None,
                          "ours / seed", ".2f"), ("activation_bytes", "activations MiB", "mib")]))
    ours_slope = slope([r["n_hashes"] for r in h], [r["peak_bytes"] / MIB for r in h])
    seed_slope = slope(list(seed.HASHES_MB), list(seed.HASHES_MB.values()))
    sequential = all(r.get("sequential_rounds") for r in h)
    if sequential:
        w(f"Ours {ours_slope:,.1f} MiB per round, the seed's {seed_slope:,.0f} MB per round. Hash rounds are processed "
          "one at a time (`sequential_rounds`, the default), in the forward and in the backward pass, combined "
          "online by their logsumexp: only one round's sorted buffers and chunk scores are ever alive, so the peak "
          "no longer follows n_r (the seed's conclusion, 'the main bottleneck of the reformer w.r.t. memory is the "
          "number of hash rounds', no longer holds here). All rounds at once, for comparison: see target 1 of the "
          "floor table below.\n")
    else:
        w(f"Linear in rounds in both: ours {ours_slope:,.0f} MiB per round, the seed's {seed_slope:,.0f} MB per "
          "round: all rounds at once (`sequential_rounds=False`) sorts, gathers and scores every round together.\n")

    # Experiment 3
    lay = data["layers"]
    w("## Experiment 3: memory against depth\n")
    w(f"![layers]({rel}/layers.png)\n")
    w(markdown_table(lay, [(lambda r: seed.LABELS[r["model"]], "model", "s"), ("n_layers", "layers", ""),
                           ("seed_mb", "seed MB", ""), ("peak_bytes", "ours MiB", "mib"),
                           ("activation_bytes", "activations MiB", "mib")]))
    per_layer = {}
    for m in ("reformer", "transformer"):
        mine = sorted((r for r in lay if r["model"] == m), key=lambda r: r["n_layers"])
        per_layer[m] = (slope([r["n_layers"] for r in mine], [r["peak_bytes"] / MIB for r in mine]),
                        slope([r["n_layers"] for r in mine], [r["activation_bytes"] / MIB for r in mine]))
    sr = seed.LAYERS_MB["reformer"]
    st = seed.LAYERS_MB["transformer"]
    w(f"Per added layer: Reformer {per_layer['reformer'][0]:,.1f} MiB of peak, of which "
      f"{per_layer['reformer'][1]:,.2f} MiB activations (the rest is the layer's parameters, gradients, Adafactor "
      f"state and update temporaries); the seed's Reformer grew {(sr[12] - sr[2]) / 10:,.1f} MB per layer. "
      f"Transformer: {per_layer['transformer'][0]:,.0f} MiB per layer (seed: {(st[8] - st[4]) / 4:,.0f} MB).\n")

    # Table 5
    s = data["seqlen"]
    w("## Paper Table 5: activation memory against length\n")
    w(f"![seqlen]({rel}/seqlen.png)\n")
    ex = {}
    for r in s:
        ex.setdefault(r["model"], r)
    w(markdown_table(list(ex.values()), [
        (lambda r: seed.LABELS[r["model"]], "model", "s"),
        (lambda r: f"{min(x['seq_len'] for x in s)}-{max(x['seq_len'] for x in s)}", "lengths", "s"),
        ("fitted_exponent", "fitted exponent", ".2f"), ("last_pair_exponent", "exponent, last two lengths", ".2f"),
        ("table5_exponent", "Table 5", "")]))
    w(f"Measured with `--seqlen_optimizer={s[0]['optimizer']}` (loss and gradients; activations without the "
      "update's temporaries). Full attention tends to l^2 as the score matrix takes over from the l-linear "
      "terms; LSH attention is linear in l. The lengths' activation MiB are in [`seqlen.md`](" + rel + "/seqlen.md).\n")

    # Timeline
    t = {r["model"]: r for r in data["timeline"]}
    w("## Live memory across one step (the seed's memory-over-time figure)\n")
    w(f"![timeline]({rel}/timeline.png)\n")
    w(markdown_table(list(t.values()), [
        (lambda r: seed.LABELS[r["model"]], "model", "s"), ("scan_layers", "scan_layers", ""),
        ("peak_bytes", "memory_analysis peak MiB", "mib"), ("xla_live_peak_bytes", "XLA live-range peak MiB", "mib"),
        ("curve_peak_bytes", "rebuilt curve max MiB", "mib"),
        (lambda r: r["peak_by_scope"][0]["scope"], "largest named scope at the peak", "s"),
        (lambda r: r["peak_by_scope"][0]["bytes"], "its MiB", "mib")]))
    unrolled = [m for m in ("transformer", "lsh") if m in t and m in v and t[m]["scan_layers"] is False]
    if unrolled:
        w("Unrolling changes the peak itself, not just the picture:\n")
        w(markdown_table([dict(model=m, scanned=v[m]["peak_bytes"], unrolled=t[m]["peak_bytes"],
                               ratio=t[m]["peak_bytes"] / v[m]["peak_bytes"]) for m in unrolled],
                         [(lambda r: seed.LABELS[r["model"]], "model", "s"),
                          ("scanned", "lax.scan (experiment 1) MiB", "mib"),
                          ("unrolled", "unrolled Python loop MiB", "mib"), ("ratio", "unrolled / scanned", ".2f")]))
        w("Unrolled, the LSH LM's forward-pass LSH tensors (`lsh_sort`, `lsh_chunk_attention` in "
          "[`timeline.md`](" + rel + "/timeline.md)) are still live at the peak in the backward pass: in one "
          "straight-line program XLA evidently shares (common-subexpression-eliminates) the custom gradient's "
          "recomputation with the forward pass, so every layer's sorted, chunked tensors are kept, much as PyTorch "
          "autograd keeps them (a known hazard of custom gradients inside one unrolled program). Under `lax.scan` the "
          "recomputation stays separate and nothing of it is stored. The unrolled Transformer is lower than the "
          "scanned one, probably because without the scan's stacked per-layer carries XLA can free each layer's "
          "buffers as soon as its backward pass is done; we have not traced it further.\n")
    w("The Transformer and LSH LM are unrolled (`scan_layers=False`) for this figure so each layer's stored "
      "activations appear as a step of the staircase; the reversible stacks are one `lax.scan` whose body appears "
      "once in XLA's flattened schedule, so their curves are a picture and XLA's peak is the number. The peak "
      "breakdown by named scope of every variant is in [`timeline.md`](" + rel + "/timeline.md).\n")

    # Runtime
    rt = data["runtime"]
    w("## Runtime against the compile-time prediction\n")
    w(f"![runtime]({rel}/runtime.png)\n")
    w(markdown_table(rt, [(lambda r: seed.LABELS[r["model"]], "model", "s"),
                          ("peak_bytes", "compile-time peak MiB", "mib"), ("runtime_peak_bytes", "runtime MiB", "mib"),
                          ("runtime_over_compile", "runtime / compile-time", ".2f"),
                          (lambda r: max(r["step_s"]), "slowest step s", ".1f"), ("runtime_source", "source", "s")]))
    if any(r["command"] != first["command"] for r in rt):
        w(f"(Runtime command: `{rt[0]['command']}`.)\n")
    for r in rt:
        if r["model"] in v and r["peak_bytes"] != v[r["model"]]["peak_bytes"]:
            w(f"Note: the runtime worker's compile of the {seed.LABELS[r['model']]} planned "
              f"{r['peak_bytes'] / MIB:,.1f} MiB (XLA temp {r['temp_bytes']:,} bytes) where experiment 1 planned "
              f"{v[r['model']]['peak_bytes'] / MIB:,.1f} MiB (temp {v[r['model']]['temp_bytes']:,} bytes) for the "
              "same configuration in another process. The two compiles' buffer assignments differ; the cause is "
              "not known.\n")
    w(f"On CPU the runtime figure is the process's resident set size, sampled during {rt[0]['steps']} real steps, "
      "above its value just before the state was created: it also counts allocator caching and XLA:CPU's "
      "runtime scratch, so it agrees with the compile-time figure only roughly.\n")

    # Floor
    fl = data["floor"]
    w("## Memory-floor targets\n")
    w(markdown_table(fl, [("target", "target", "s"), ("criterion", "criterion", "s"), ("measured", "measured", ".3f"),
                          ("limit", "limit", "g"), ("detail", "values", "s"), ("status", "status", "s")]))
    w("floor = parameters + gradients + optimizer state + batch + 4 x batch x length x d_model x 4 bytes. "
      "'short' means a target is not reached; every figure is reported as measured.\n")

    # Discussion
    w("## What agrees, what differs, and why\n")
    w(f"- **Agrees:** the Transformer is the largest and the Reformer the smallest; the Transformer grows by a full "
      f"layer of activations per layer. **Beats:** Reformer memory is flat in hash rounds ({ours_slope:,.1f} MiB "
      f"per round against the seed's {seed_slope:,.0f}) and far below the seed's at every depth. **Short:** its "
      f"full step still grows {per_layer['reformer'][0]:,.1f} MiB per layer (the seed's "
      f"{(sr[12] - sr[2]) / 10:,.1f}): each layer's parameters, gradients and Adafactor state, and the update's "
      f"temporaries, which grow with the stacked parameters because the update is not done layer by layer; its "
      f"activation memory without the update is flat (floor target 2).")
    w(f"- **LSH LM below Reversible LM (the seed had LSH 5100 > Reversible 2100).** Our LSH attention is a "
      f"`jax.custom_vjp` that recomputes the chunked attention in the backward pass and keeps only q/k, v and the "
      f"int bucket ids per layer, so the LSH LM stores per layer about what a Transformer stores minus its score "
      f"matrices ({mib(v['lsh']['activation_bytes'])} MiB activations in all). The Reversible LM stores nothing "
      f"per layer but still materialises full [8, 4096, 4096] float32 score, probability and gradient matrices "
      f"(512 MiB each) inside one layer's attention ({mib(v['reversible']['activation_bytes'])} MiB). The seed's "
      f"PyTorch LSH LM kept every round's chunked scores for autograd in all 6 layers; so does ours when the "
      f"layers are unrolled (LSH LM {mib(t['lsh']['peak_bytes']) if 'lsh' in t else 'n/a'} MiB unrolled, "
      f"above the Reversible LM, as in the seed: see the timeline section).")
    w("- **fp16 against float32.** The seed trained with fp16 mixed precision, so its stored activations took half "
      "our bytes; ours are float32 (the `--dtype=bfloat16` view computes blocks in bfloat16 but keeps residual "
      "streams, softmax and parameters in float32). That the float32 figures still land near the seed's is "
      "probably XLA's doing: fused elementwise intermediates never exist as buffers, where PyTorch's eager "
      "autograd allocates (and often saves) each of them.")
    w(f"- **Adafactor state** is small: factored second moments take {mib(v['reformer']['optimizer_state_bytes'])} "
      f"MiB against {mib(v['reformer']['param_bytes'])} MiB of parameters; the update's temporaries (about 0.9x the "
      f"stacked parameter bytes) fit inside memory freed by the backward pass here. The Reformer's peak rises per "
      f"layer by that layer's parameters and gradients (plus its small Adafactor state) while its activations stay "
      f"flat.")
    w("- **What the seed's hooks could not see.** PyTorch hooks log memory at module boundaries; allocations made "
      "and freed inside one attention call (score matrices, softmax, their gradients) are visible only through "
      "the allocator's peak counter. XLA's analysis counts every buffer of the whole step, including the "
      "backward pass's transient score gradients, so our Transformer peak is above the seed's "
      f"({mib(v['transformer']['peak_bytes'])} MiB against {seed.VARIANTS_MB['transformer']} MB).")
    w("- **Compile-time against runtime:** the compile-time peak is what XLA plans; the CPU RSS column is a coarse "
      "check of it (see the runtime table). GPU runtime figures are still to come.")
    return out
