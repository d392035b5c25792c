"""Generation speed: cached decoding against the window re-reading sampler and Hugging Face's cached generate.

    python -m benchmarks.generate                      # prompts of 1k, 4k, 16k and 64k tokens
    python -m benchmarks.generate --contexts=1024,4096 --new_tokens=200
    python -m benchmarks.generate --score_workdir=RUN --data_path=FILE   # bpc of a run: cached decoding vs forward
    python -m benchmarks.generate --full_cache_lens=8192,65536   # full attention: per-token time by cache size

One model, built at random in Hugging Face (LSH and local layers alternating, as its checkpoints) and converted, so
all three run the same weights: ours (`reformer_jax.decoding`), the window sampler (`decoding.window_sampler`, one
forward pass over a window holding the whole context per token) and Hugging Face's `generate(use_cache=True)`,
side by side at each prompt length, alternating, best of --repeats. A Transformer (full attention, same sizes) runs
ours and the sampler as far as the sampler fits. Per-token times exclude the prefill (reported on its own) and
compilation. Cache bytes per position and layer: the growth of the decode loop's state (the argument of its
compiled loop) between two cache lengths. Writes generate.{json,csv,md,png} in --out_dir.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import cli, output, targets
from reformer_jax.decoding import cache as cache_lib
from reformer_jax.decoding import generation
from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import init_params

FLAGS = flags.FLAGS
SIZES = dict(d_model=256, n_heads=4, d_head=64, d_ff=512, n_layers=4, chunk_len=64, n_hashes=2, vocab_size=259)


def define_flags() -> None:
    flags.DEFINE_list("contexts", ["1024", "4096", "16384", "65536"], "Prompt lengths (tokens).")
    for name, default, help_ in [
            ("new_tokens", 1000, "Tokens our cached decoding generates per measurement."),
            ("hf_tokens", 100, "Tokens Hugging Face generates per measurement (above 4k: 30% of them)."),
            ("sampler_tokens", 3, "Tokens the window sampler generates per measurement."),
            ("transformer_tokens", 100, "Tokens the Transformer's cached decoding generates per measurement."),
            ("sampler_max_context", 16384, "Longest context the window re-reading sampler is run at."),
            ("transformer_sampler_max_context", 4096, "Longest context for the Transformer's sampler."),
            ("transformer_max_context", 4096, "Longest context for the Transformer's cached decoding (its prefill "
                                              "holds a [heads, l, l] score matrix: 4 GiB per layer at 16k)."),
            ("repeats", 2, "Alternating repetitions; the best time counts."),
            ("score_sequences", 8, "Validation sequences (of the run's seq_len) --score_workdir scores.")]:
        flags.DEFINE_integer(name, default, help_)
    flags.DEFINE_string("out_dir", cli.DEFAULT_OUT_DIR, "Where generate.{json,csv,md,png} go.")
    flags.DEFINE_string("score_workdir", None, "Instead of the speed runs: score validation text of this main.py run "
                        "by cached decoding and by the forward pass (generate_bpc.{json,md}).")
    flags.DEFINE_string("data_path", None, "For --score_workdir: a text file to score (default: the run's data).")
    flags.DEFINE_list("full_cache_lens", [], "Instead of the speed runs: the Transformer's cached decoding at a "
                      "--full_context-token prompt with each of these cache lengths (max_len), alternating, "
                      "--transformer_tokens per measurement (generate_full.{json,md}).")
    flags.DEFINE_integer("full_context", 4096, "Prompt tokens of --full_cache_lens.")


def reformer_config(max_len: int) -> ModelConfig:
    n_buckets = ModelConfig(attention="lsh", max_len=max_len, chunk_len=SIZES["chunk_len"]).resolved_n_buckets(max_len)
    return ModelConfig(**SIZES, max_len=max_len, attn_layers=("local", "lsh") * 2, reversible=True,
                       n_buckets=n_buckets, local_chunk_len=SIZES["chunk_len"], sequential_rounds=False, dropout=0.0,
                       pos_embedding="axial", output_head="concat", tie_embeddings=False, layer_norm_eps=1e-12)


def hf_model(config: ModelConfig):
    """A random Hugging Face ReformerModelWithLMHead of `config`'s sizes, or None without torch / transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    hf_config = transformers.ReformerConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_attention_heads=config.n_heads,
        attention_head_size=config.d_head, feed_forward_size=config.d_ff, attn_layers=list(config.layer_types),
        is_decoder=True, axial_pos_embds=True, axial_pos_shape=config.axial_shape,
        axial_pos_embds_dim=config.axial_dims, max_position_embeddings=config.max_len, num_hashes=config.n_hashes,
        lsh_attn_chunk_length=config.chunk_len, local_attn_chunk_length=config.local_chunk_len,
        num_buckets=list(config.n_buckets) if isinstance(config.n_buckets, tuple) else config.n_buckets,
        lsh_num_chunks_before=1, local_num_chunks_before=1, hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0, hidden_act="relu",
        pad_token_id=0, eos_token_id=1, hash_seed=0)
    return transformers.ReformerModelWithLMHead(hf_config).float().eval()


def _generation(config, params, prompt) -> generation.Generation:
    g = generation.Generation(config, params, [prompt], rng=jax.random.key(0))
    g.set_sampling(greedy=True, temperature=1.0, top_k=None, top_p=None)
    return g


def ours_per_token(config, params, prompt, n_tokens: int) -> Dict[str, float]:
    """(prefill seconds, seconds per generated token) of cached decoding, after a compile-only warm-up."""
    _generation(config, params, prompt).advance(2)
    started = time.perf_counter()
    g = _generation(config, params, prompt)
    jax.block_until_ready(g.state)
    prefill, started = time.perf_counter() - started, time.perf_counter()
    g.advance(n_tokens)
    jax.block_until_ready(g.state["tokens"])
    return {"prefill_s": prefill, "per_token_s": (time.perf_counter() - started) / n_tokens}


def sampler_per_token(config, params, prompt, n_tokens: int) -> float:
    """Seconds per token of the window sampler at a context of len(prompt) tokens: its per-token work, one forward
    pass over a window holding the context (`window_sampler.next_token`), timed after a warm-up."""
    from reformer_jax.decoding.window_sampler import next_token

    buffer = jnp.asarray(np.asarray(prompt, np.int32)[None])
    position, temperature = jnp.int32(len(prompt) - 1), jnp.float32(0.8)
    jax.block_until_ready(next_token(config, params, buffer, position, jax.random.key(0), temperature))
    started = time.perf_counter()
    for i in range(n_tokens):
        jax.block_until_ready(next_token(config, params, buffer, position, jax.random.key(i), temperature))
    return (time.perf_counter() - started) / n_tokens


def hf_per_token(model, prompt, n_tokens: int) -> Dict[str, float]:
    """(prefill seconds, seconds per generated token) of Hugging Face's generate(use_cache=True), greedy."""
    import torch

    ids = torch.from_numpy(np.asarray(prompt, np.int64)[None])
    kwargs = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill, started = time.perf_counter() - started, time.perf_counter()
        model.generate(ids, max_new_tokens=n_tokens + 1, min_new_tokens=n_tokens + 1, **kwargs)
    return {"prefill_s": prefill, "per_token_s": max(time.perf_counter() - started - prefill, 1e-9) / n_tokens}


def cache_bytes_per_position(config: ModelConfig) -> float:
    """Growth of the decode state's bytes (the compiled decode loop's argument, parameters aside) per cache
    position, divided by the layers whose cache grows with the length, minus the loop's own per-position buffers
    (tokens, log-probabilities, forced tokens: 12 bytes)."""
    sizes = []
    for length in (1024, 2048):
        cfg = cache_lib.decode_config(config).replace(max_len=length, axial_shape=None, axial_dims=None)
        cfg = cfg.replace(n_buckets=config.n_buckets) if config.uses("lsh") else cfg
        g = _generation(cfg, init_params(cfg, jax.random.key(0)), np.array([5, 6, 7]))
        sizes.append(sum(leaf.nbytes for leaf in jax.tree.leaves(g.state)))
    return ((sizes[1] - sizes[0]) / 1024 - 12) / sum(kind != "local" for kind in config.layer_types)


def run(contexts: List[int]) -> List[Dict[str, Any]]:
    max_len = -(-(max(contexts) + FLAGS.new_tokens) // 1024) * 1024
    reformer = reformer_config(max_len)
    hf = hf_model(reformer)
    if hf is not None:
        from reformer_jax.model.hf_convert import from_hf

        reformer, params = from_hf(hf.state_dict(), hf.config.to_dict())
    else:
        params = init_params(reformer, jax.random.key(0))
    transformer = transformer_config(max_len)
    transformer_params = init_params(transformer, jax.random.key(0))
    text = np.random.default_rng(0).integers(3, 259, max(contexts)).astype(np.int32)
    rows = []
    for context in contexts:
        prompt = text[:context]
        hf_tokens = FLAGS.hf_tokens if context <= 4096 else max(1, FLAGS.hf_tokens * 3 // 10)
        row: Dict[str, Any] = {"context": context, "new_tokens": FLAGS.new_tokens, "hf_tokens": hf_tokens,
                               "sampler_tokens": FLAGS.sampler_tokens}
        best: Dict[str, float] = {}
        for _ in range(FLAGS.repeats):
            ours = ours_per_token(reformer, params, prompt, FLAGS.new_tokens)
            measured = {"ours_s": ours["per_token_s"], "ours_prefill_s": ours["prefill_s"]}
            if context <= FLAGS.sampler_max_context:
                measured["sampler_s"] = sampler_per_token(reformer, params, prompt, FLAGS.sampler_tokens)
            if hf is not None:
                theirs = hf_per_token(hf, prompt, hf_tokens)
                measured.update(hf_s=theirs["per_token_s"], hf_prefill_s=theirs["prefill_s"])
            if context <= FLAGS.transformer_max_context:
                measured["transformer_s"] = ours_per_token(transformer, transformer_params, prompt,
                                                           FLAGS.transformer_tokens)["per_token_s"]
            if context <= FLAGS.transformer_sampler_max_context:
                measured["transformer_sampler_s"] = sampler_per_token(transformer, transformer_params, prompt,
                                                                      FLAGS.sampler_tokens)
            best.update({key: min(best.get(key, math.inf), value) for key, value in measured.items()})
            print(f"context {context}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in measured.items()),
                  flush=True)
        row.update(best, ours_tokens_per_s=1.0 / best["ours_s"])
        if "sampler_s" in row:
            row["speedup_vs_sampler"] = row["sampler_s"] / row["ours_s"]
        if "hf_s" in row:
            row["speedup_vs_hf"] = row["hf_s"] / row["ours_s"]
        rows.append(row)
    base = next((r for r in rows if r["context"] == 4096), rows[0])
    states = 4 * reformer.d_model  # Hugging Face caches each layer's layer-normed hidden state (float32) ...
    cache = {"ours_lsh_bytes_per_position_xla": cache_bytes_per_position(reformer),
             "ours_lsh_bytes_per_position_layout": cache_lib.bytes_per_token(cache_lib.decode_config(reformer), "lsh"),
             "ours_local_bytes_per_position": 0, "hf_local_bytes_per_position": states,
             "hf_lsh_bytes_per_position": states + 8 * reformer.n_heads * reformer.n_hashes}  # ... and int64 buckets
    versions = {}
    for name in ("torch", "transformers", "flax"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    for row in rows:
        row.update(per_token_vs_4k=row["ours_s"] / base["ours_s"], **cache, machine=output.machine(),
                   max_len=max_len, sizes=SIZES, model=list(reformer.layer_types), peers=versions, cpu_shared=True,
                   command=cli.command("benchmarks.generate", sys.argv))
    return rows


def transformer_config(max_len: int) -> ModelConfig:
    return ModelConfig.preset("transformer", **{k: SIZES[k] for k in ("vocab_size", "d_model", "n_heads", "d_ff",
                                                                      "n_layers")}, max_len=max_len, dropout=0.0)


def full_cache_rows(context: int, cache_lens: List[int]) -> List[Dict[str, Any]]:
    """Full-attention cached decoding at one context with caches of each length (best of --repeats, alternating):
    a step reads the cache up to its position, so the per-token time should not follow the cache's length."""
    prompt = np.random.default_rng(0).integers(3, 259, context).astype(np.int32)
    models = [(n, transformer_config(n)) for n in cache_lens]
    models = [(n, config, init_params(config, jax.random.key(0))) for n, config in models]
    best: Dict[int, float] = {}
    for _ in range(FLAGS.repeats):
        for n, config, params in models:
            per_token = ours_per_token(config, params, prompt, FLAGS.transformer_tokens)["per_token_s"]
            best[n] = min(best.get(n, math.inf), per_token)
            print(f"max_len {n}: {per_token * 1e3:.2f} ms / token", flush=True)
    return [{"context": context, "max_len": n, "per_token_s": best[n], "new_tokens": FLAGS.transformer_tokens,
             "repeats": FLAGS.repeats, "sizes": SIZES, "machine": output.machine(), "loadavg": os.getloadavg(),
             "command": cli.command("benchmarks.generate", sys.argv)} for n in cache_lens]


def full_cache_markdown(rows: List[Dict[str, Any]]) -> str:
    first, machine = rows[0], rows[0]["machine"]
    return "\n".join([
        "# Full-attention cached decoding: per-token time by cache length", "",
        f"Command: `{first['command']}`. Transformer (full attention), d_model {SIZES['d_model']}, {SIZES['n_heads']} "
        f"heads of {SIZES['d_head']}, d_ff {SIZES['d_ff']}, {SIZES['n_layers']} layers; a {first['context']}-token "
        f"prompt, batch 1, greedy, {first['new_tokens']} tokens per measurement, best of {first['repeats']} "
        f"alternating runs, compilation and prefill excluded. Machine: {machine['platform']}, {machine['cpu_count']} "
        f"CPUs (shared with other jobs; 1-minute load average at the end {first['loadavg'][0]:.1f}), jax "
        f"{machine['jax_version']}.", "",
        output.markdown_table(rows, [("max_len", "cache positions (max_len)", "d"),
                                     (lambda r: 1e3 * r["per_token_s"], "ms / token", ".2f")]),
        *targets.full_cache_target_lines(rows), ""])


def markdown(rows: List[Dict[str, Any]]) -> str:
    ms = lambda key: (lambda r: None if r.get(key) is None else 1e3 * r[key])  # noqa: E731
    columns = [("context", "prompt tokens", "d"), (ms("ours_s"), "ours ms/token", ".2f"),
               ("ours_tokens_per_s", "ours tokens/s", ".1f"), (ms("sampler_s"), "sampler ms/token", ".1f"),
               ("speedup_vs_sampler", "x vs sampler", ".1f"), (ms("hf_s"), "HF cached ms/token", ".2f"),
               ("speedup_vs_hf", "x vs HF", ".2f"), ("per_token_vs_4k", "ours vs 4k", ".2f"),
               (ms("ours_prefill_s"), "ours prefill ms", ".0f"), (ms("hf_prefill_s"), "HF prefill ms", ".0f"),
               (ms("transformer_s"), "Transformer ours ms/token", ".2f"),
               (ms("transformer_sampler_s"), "Transformer sampler ms/token", ".1f")]
    first, machine = rows[0], rows[0]["machine"]
    return "\n".join([
        "# Generation speed: cached decoding vs the window re-reading sampler vs Hugging Face", "",
        f"Model: {first['model']} (reversible), d_model {SIZES['d_model']}, {SIZES['n_heads']} heads of "
        f"{SIZES['d_head']}, d_ff {SIZES['d_ff']}, {SIZES['n_hashes']} hash rounds, chunks of {SIZES['chunk_len']}, "
        f"max_len {first['max_len']}; batch 1, greedy. Ours generates {first['new_tokens']} tokens per measurement "
        f"(the Transformer {FLAGS.transformer_tokens}), Hugging Face {first['hf_tokens']} (30% of that above 4k), "
        f"the sampler {first['sampler_tokens']}; best of {FLAGS.repeats} alternating runs, compilation and prefill "
        f"excluded. Machine: {machine['platform']}, {machine['cpu_count']} CPUs (shared with other jobs), jax "
        f"{machine['jax_version']}, {first['peers']}.", "", output.markdown_table(rows, columns),
        *targets.generation_target_lines(rows), "",
        f"Cache bytes per position and layer: ours {first['ours_lsh_bytes_per_position_xla']:.0f} per LSH layer "
        f"(the decode loop's state; layout {first['ours_lsh_bytes_per_position_layout']}: keys and values "
        f"{8 * SIZES['d_model']}, bucket ids and the two links of the bucket index), 0 per local layer (a ring "
        f"buffer of {2 * SIZES['chunk_len']} positions); Hugging Face {first['hf_lsh_bytes_per_position']:.0f} per "
        f"LSH layer (hidden state and int64 bucket ids) and {first['hf_local_bytes_per_position']:.0f} per local "
        "layer (hidden state).", ""])


def plot(rows: List[Dict[str, Any]], ax) -> None:
    for key, label in (("ours_s", "ours (cached)"), ("hf_s", "Hugging Face (cached)"),
                       ("sampler_s", "today's sampler (re-reads the context)"),
                       ("transformer_s", "Transformer, ours (cached)")):
        points = [(r["context"], 1e3 * r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    output.finish(ax, xlog=2, ylog=10, xlabel="prompt tokens", ylabel="ms per generated token", legend={})
    ax.set_xticks([r["context"] for r in rows], [f"{r['context'] // 1024}k" for r in rows])


def score_run(workdir: str) -> List[Dict[str, Any]]:
    """Bits per character of the same validation sequences of a main.py run: its training forward pass (as its
    evaluation computes it) and cached decoding (prefill of the first token, then every token fed in turn)."""
    from reformer_jax.training import data, saved_run
    from reformer_jax.training.evaluation import token_scores

    model = saved_run.open_run(workdir)
    config, params, settings = model.config, saved_run.restore_params(model), model.settings
    seq_len = settings["seq_len"]
    dataset = (data.load_dataset(settings["dataset"], seq_len=seq_len, data_path=FLAGS.data_path) if FLAGS.data_path
               else data.reopen(model.data, seq_len=seq_len, tokenizer=model.tokenizer, flag="--score_workdir"))
    forward, decoded = [], []
    for i in range(FLAGS.score_sequences // 4):
        batch = dataset.batch("validation", settings["seed"], i, 4, seq_len)
        log_probs, _ = token_scores(config, params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]),
                                    jax.random.key(10_000 + i))
        forward.append(np.asarray(log_probs)[:, :-1])  # the last position's target is not a decoded token
        decoded.append(generation.score(config, params, batch["inputs"], rng=jax.random.key(i)))
    forward_bpc, decoded_bpc = (-float(np.mean(np.concatenate(x))) / math.log(2) for x in (forward, decoded))
    return [{"run": model.describe(), "model": list(config.layer_types), "n_hashes": config.n_hashes,
             "chunk_len": config.chunk_len, "seq_len": seq_len, "sequences": 4 * (FLAGS.score_sequences // 4),
             "forward_bpc": forward_bpc, "cached_decoding_bpc": decoded_bpc,
             "relative_difference": decoded_bpc / forward_bpc - 1, "machine": output.machine(),
             "command": cli.command("benchmarks.generate", sys.argv)}]


def main(argv):
    del argv
    if FLAGS.score_workdir:
        rows = score_run(FLAGS.score_workdir)
        text = ("# Scoring a trained model by cached decoding\n\n" + output.markdown_table(rows, [
            ("run", "run", ""), ("sequences", "sequences", "d"), ("seq_len", "tokens each", "d"),
            ("forward_bpc", "forward pass bpc", ".4f"), ("cached_decoding_bpc", "cached decoding bpc", ".4f"),
            ("relative_difference", "difference", "+.2%")])
            + f"\nWithin 2%: {output.met(abs(rows[0]['relative_difference']) < 0.02)}.\n")
        name, draw = "generate_bpc", None
    elif FLAGS.full_cache_lens:
        rows = full_cache_rows(FLAGS.full_context, sorted(int(n) for n in FLAGS.full_cache_lens))
        text, name, draw = full_cache_markdown(rows), "generate_full", None
    else:
        rows = run([int(c) for c in FLAGS.contexts])
        text, name, draw = markdown(rows), "generate", lambda ax: plot(rows, ax)
    print(text)
    for path in output.write_outputs(FLAGS.out_dir, name, rows, text, draw, (7.0, 4.2)):
        print("wrote", path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
