"""`benchmarks.speed --profile`: where the training step's time goes, per --ours setting.

    python -m benchmarks.speed --profile [--ours=default,lean_compile] [size flags]

The speed driver's worker (benchmarks.speed_worker) compiles the step as it does for timing, then, on the
`profile N` command, runs `reformer_jax.xla.profile.profile_step` (N steps untraced: how many cores the step keeps
busy; N traced: op time by kind) and `probe_matmuls` (the attention's chunk product and a feed-forward matmul of
the same sizes, timed on their own). This module draws the tables and the plot from those rows.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from benchmarks.output import finish, markdown_table
from reformer_jax.xla import profile


def probe_matmuls(config, seq_len: int, batch_size: int, compiler_options: Optional[Dict[str, Any]],
                  repeats: int = 30) -> List[Dict[str, Any]]:
    """The step's two matmul shapes on their own (`profile.probe_einsum`): the chunk product of one head and round
    of LSH attention ([l / c] x [c, k] x [k, (n_before + 1) c], float32 as attention computes it) and one
    feed-forward chunk ([f, d] x [d, d_ff], in the compute dtype); and the same chunk product computed over blocks
    of 2 and 4 chunks as one larger matmul each (a block's queries against its keys and the look-back, the scores
    outside each chunk's band wasted: "used" is the fraction of its FLOPs the attention needs)."""
    c, n_before = config.chunk_len, config.n_chunks_before
    rows = seq_len * batch_size
    ff_rows = min(config.ff_chunk_len or seq_len, seq_len) * batch_size

    def chunk_product(block):  # blocks of `block` chunks: [rows / (block c), block c, k] x [.., (block + n_before) c, k]
        return ((rows // (block * c), block * c, config.d_head), (rows // (block * c), (block + n_before) * c,
                                                                  config.d_head))

    cases = [("chunk product (one head, one round)", "nqk,nsk->nqs", "float32", chunk_product(1), 1.0),
             ("feed-forward matmul (one chunk)", "qd,df->qf", config.compute_dtype,
              ((ff_rows, config.d_model), (config.d_model, config.d_ff)), 1.0)]
    cases += [(f"chunk product over blocks of {block} chunks", "nqk,nsk->nqs", "float32", chunk_product(block),
               (n_before + 1) / (block + n_before)) for block in (2, 4) if rows % (block * c) == 0]
    return [{"what": what, "used": used, **profile.probe_einsum(spec, shapes, dtype, compiler_options, repeats)}
            for what, spec, dtype, shapes, used in cases]


def _kind_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Kinds of op down, settings across: ms per step, % of the ops' time, GFLOP/s (chunk products only)."""
    table = []  # one row per kind: {"label", "entries": {setting: by_kind entry}}
    for key, label in profile.KINDS:
        entries = {r["setting"]: k for r in rows for k in r["by_kind"] if k["kind"] == key}
        if entries:
            table.append({"label": label, "entries": entries})
    table.append({"label": "between ops (dispatch, asynchronous matmuls' remaining work; 0 where events overlap)",
                  "entries": {r["setting"]: {"s_per_step": r["between_ops_s_per_step"]} for r in rows}})
    table.append({"label": "traced step", "entries": {r["setting"]: {"s_per_step": r["traced_step_s"]} for r in rows}})

    def cell(setting, field, scale=1.0):
        def value(t):
            v = t["entries"].get(setting, {}).get(field)
            return None if v is None else v * scale
        return value

    columns = [("label", "kind of op", "s")]
    for r in rows:
        s = r["setting"]
        columns += [(cell(s, "s_per_step", 1e3), f"{s}: ms / step", ",.1f"),
                    (cell(s, "share", 100.0), f"{s}: % of op time", ".1f"),
                    (cell(s, "gflops_per_s"), f"{s}: GFLOP/s", ".0f")]
    return markdown_table(table, columns)


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """The profile tables: op time by kind per setting, the first setting's costliest ops, the matmul probes."""
    out = []
    for r in rows:
        out.append(f"- **{r['setting']}**: {r['untraced_step_s']:.3g} s per step untraced, {r['busy_cores']:.2f} "
                   f"cores busy (process CPU time / wall time); traced {r['traced_step_s']:.3g} s, of which the ops "
                   f"account for {r['op_time_over_traced_wall'] * 100:.0f}% ({r['profiled_steps']} steps each).")
    out.append("\nOp time by kind (exclusive time of each op's trace events, per step; share of the ops' time; "
               "GFLOP/s of the chunk products from their HLO shapes):\n")
    out.append(_kind_table(rows))
    first = rows[0]
    out.append(f"\nThe {profile.TOP_OPS} costliest ops of **{first['setting']}** (per step):\n")
    out.append(markdown_table(first["top_ops"], [
        ("op", "HLO op", "s"), (lambda o: profile.KIND_LABELS[o["kind"]].split(" (")[0], "kind", "s"), ("shape", "shape", "s"),
        (lambda o: o["s_per_step"] * 1e3, "ms / step", ",.1f"), ("calls_per_step", "calls / step", ",.0f"),
        ("us_per_call", "µs / call", ",.0f"), (lambda o: o["share"] * 100, "% of op time", ".1f"),
        ("gflops_per_s", "GFLOP/s", ".0f")]))
    out.append("\nThe same matmul shapes on their own (compiled with the setting's options; CPU time / wall time "
               "says how many cores the one op keeps busy):\n")
    out.append(markdown_table([dict(p, setting=r["setting"]) for r in rows for p in r["probes"]], [
        ("setting", "setting", "s"), ("what", "matmul", "s"),
        (lambda p: " x ".join(str(tuple(s)) for s in p["shapes"]), "operands", "s"), ("dtype", "dtype", "s"),
        ("us_per_call", "µs / call", ",.0f"), ("busy_cores", "cores busy", ".2f"),
        ("gflops_per_s", "GFLOP/s", ".0f"), (lambda p: p.get("used", 1.0), "used", ".2f"),
        (lambda p: p["gflops_per_s"] * p.get("used", 1.0), "used GFLOP/s", ".0f")]))
    out.extend("\n" + line for line in findings(rows))
    return "\n".join(out) + "\n"


def findings(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Sentences read off the first setting's profile (no number in them is typed by hand)."""
    r = rows[0]
    kinds = {k["kind"]: k for k in r["by_kind"]}
    lines = []
    chunk, dense = kinds.get("chunk_matmul"), kinds.get("dense_matmul")
    if chunk:
        text = (f"In **{r['setting']}**, the attention's chunk products take {chunk['share'] * 100:.0f}% of the op "
                f"time ({chunk['s_per_step']:.2f} s per step) at {chunk['gflops_per_s']:.0f} GFLOP/s")
        if dense and dense.get("gflops_per_s"):
            text += f"; the dense matmuls run at {dense['gflops_per_s']:.0f} GFLOP/s"
        lines.append(text + ".")
    probe = next((p for p in r.get("probes", []) if p["what"].startswith("chunk")), None)
    dense_probe = next((p for p in r.get("probes", []) if p["what"].startswith("feed")), None)
    if probe and dense_probe:
        lines.append(f"On its own, one round's chunk product keeps {probe['busy_cores']:.2f} cores busy "
                     f"({probe['gflops_per_s']:.0f} GFLOP/s), the feed-forward matmul "
                     f"{dense_probe['busy_cores']:.2f} ({dense_probe['gflops_per_s']:.0f} GFLOP/s).")
    blocks = [p for p in r.get("probes", []) if p["what"].startswith("chunk product over")]
    if probe and blocks:
        lines.append("As one larger matmul per block of chunks, the product runs at " + ", ".join(
            f"{p['gflops_per_s']:.0f} GFLOP/s over blocks of {p['shapes'][0][1] // r['chunk_len']} chunks "
            f"({p['gflops_per_s'] * p['used']:.0f} of it used)" for p in blocks)
            + f", against {probe['gflops_per_s']:.0f} chunk by chunk.")
    cores = r.get("cpu_count") or 1
    if chunk and probe and probe["busy_cores"] < 1.5 and cores > 1:
        saved = chunk["s_per_step"] * (1 - 1 / cores)
        lines.append(f"Spread over all {cores} cores at the same rate per core, the chunk products would take "
                     f"{saved:.2f} s less per step ({saved / r['untraced_step_s']:.0%} of the untraced step).")
    return lines


def plot(rows: Sequence[Dict[str, Any]], ax) -> None:
    """Seconds per step by kind of op, one stacked bar per setting."""
    colors = dict(zip((k for k, _ in profile.KINDS), ("tab:red", "tab:orange", "tab:pink", "tab:purple", "tab:brown",
                                              "tab:olive", "tab:cyan", "tab:green", "tab:gray", "black")))
    names = [r["setting"] for r in rows]
    left = [0.0] * len(rows)
    for key, label in profile.KINDS:
        widths = [next((k["s_per_step"] for k in r["by_kind"] if k["kind"] == key), 0.0) for r in rows]
        if any(widths):
            ax.barh(names, widths, left=left, color=colors[key], label=label)
            left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    finish(ax, xlabel="op time per training step (s, from the trace)", grid={"axis": "x"},
           legend={"fontsize": 7, "loc": "center left", "bbox_to_anchor": (1.01, 0.5)})
