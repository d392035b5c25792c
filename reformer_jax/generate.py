"""Generate text from a trained or converted model, streaming it as it is decoded.

    python -m reformer_jax.generate --workdir=runs/default --prompt="ROMEO:" --max_new_tokens=500
    python -m reformer_jax.generate --init_from=converted/ --prompt="The " --greedy
    python -m reformer_jax.generate --init_from=converted/ --prompt="The " --num_beams=4 --max_new_tokens=50

--workdir: a main.py run (its run_settings.json and latest checkpoint); --init_from: a converted Hugging Face
checkpoint (python -m reformer_jax.convert). Text is encoded and decoded by the tokenizer recorded with the model
(this project's runs: byte + 3; google/reformer-enwik8: byte + 2). --num_beams=N > 1 searches N beams as Hugging
Face's generate(num_beams=N) does and prints the best continuation when it is done (no streaming, no sampling
flags). Errors are one line.
"""

from __future__ import annotations

import sys
import time

from absl import flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A main.py run directory: the model of its run_settings.json, the parameters "
                    "of its latest checkpoint.")
flags.DEFINE_string("init_from", None, "A converted checkpoint directory (python -m reformer_jax.convert --out=DIR) "
                    "instead of --workdir.")
flags.DEFINE_string("prompt", None, "Text to continue (at least one character).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes) to generate.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature, > 0 (use --greedy for the most likely token).")
flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
flags.DEFINE_float("top_p", None, "Sample among the most likely tokens whose probabilities add up to this, in (0, 1].")
flags.DEFINE_bool("greedy", False, "Always pick the most likely token.")
flags.DEFINE_integer("seed", 0, "Seed of the sampling draws and the LSH hash rotations (a converted checkpoint's "
                     "recorded rotations, where it has them, are used instead).")
flags.DEFINE_integer("stream_every", 16, "Tokens decoded on the device between two prints.")
flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (Hugging Face's generate(num_beams=N)): the "
                     "most likely continuation found, printed when done; 1: sample (or --greedy) token by token.")
flags.DEFINE_bool("stop_at_eos", None, "Stop at the model's end-of-sequence id (default: on for a converted "
                  "checkpoint whose tokenizer has one, off for a main.py run, whose text has none).")


class LoadError(ValueError):
    """A --workdir or --init_from that holds no usable model."""


def _stream_text(tokenizer):
    """A writer of token blocks to stdout in the model's own tokenization (a character split over two blocks
    prints whole; special ids print nothing); `write.finish()` flushes a character left incomplete."""
    decode = tokenizer.stream_decoder()

    def write(tokens, final=False):
        sys.stdout.write(decode(tokens, final=final))
        sys.stdout.flush()

    write.finish = lambda: write([], final=True)
    return write


def run() -> int:
    from reformer_jax.training import saved_run
    from reformer_jax.training.checkpoint import CheckpointError
    from reformer_jax.decoding import generation
    from reformer_jax.decoding.beam_search import beam_search

    if (FLAGS.workdir is None) == (FLAGS.init_from is None):
        raise LoadError("pass exactly one of --workdir=DIR (a main.py run) and --init_from=DIR (a converted "
                        "checkpoint).")
    if not FLAGS.prompt:
        raise generation.GenerateError(f"--prompt={FLAGS.prompt!r} is empty: give at least one character to "
                                       "continue, e.g. --prompt='ROMEO:'.")
    beams = FLAGS.num_beams
    if beams < 1:
        raise generation.GenerateError(f"--num_beams={beams} is invalid: expected a positive integer (1 decodes token "
                                       "by token; 4 searches four beams).")
    sampling = [f"--{name}={FLAGS[name].value}" for name in ("temperature", "top_k", "top_p") if FLAGS[name].present]
    if beams > 1 and sampling:
        raise generation.GenerateError(f"--num_beams={beams} searches for the most likely continuation and does not "
                                       f"sample: drop {' '.join(sampling)} (or sample with --num_beams=1).")
    try:
        model = (saved_run.open_run(FLAGS.workdir) if FLAGS.workdir else
                 saved_run.open_model(FLAGS.init_from, flag="--init_from"))
        generation.check_decoder(model.config, f"{model.flag}={model.path}")
        if model.tokenizer is None:
            raise LoadError(f"{model.flag}={model.path} is a model of symbols, not text (the copy task): a text "
                            "--prompt cannot be encoded for it; use reformer_jax.decoding.generate with token ids.")
        params = saved_run.restore_params(model)
    except (saved_run.SavedRunError, CheckpointError) as error:
        raise LoadError(str(error)) from error
    config, source, tokenizer = model.config, model.describe(), model.tokenizer
    prompt = tokenizer.encode(FLAGS.prompt)
    rows = generation.check_arguments(config, [prompt], FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k,
                                      FLAGS.top_p, FLAGS.greedy)
    import jax
    import numpy as np

    how = "greedy" if FLAGS.greedy else (f"temperature {FLAGS.temperature:g}" + (f", top-k {FLAGS.top_k}" if FLAGS.top_k
                                         else "") + (f", top-p {FLAGS.top_p:g}" if FLAGS.top_p else ""))
    how = f"beam search, {beams} beams" if beams > 1 else how
    print(f"model: {source}, tokenizer {tokenizer.name}; {len(prompt)} prompt tokens, {FLAGS.max_new_tokens} new "
          f"({how})", file=sys.stderr)
    print("=== prompt ===")
    print(FLAGS.prompt)
    print("=== generated ===", flush=True)
    started = time.perf_counter()
    write = _stream_text(tokenizer)
    stop_at_eos = (not model.is_run) if FLAGS.stop_at_eos is None else FLAGS.stop_at_eos
    eos_id = tokenizer.eos_id if stop_at_eos else None
    shown_all = [False]

    def show(block):  # the text up to the end-of-sequence id, nothing after it
        row = np.asarray(block)[0]
        if shown_all[0]:
            return
        if eos_id is not None and (row == eos_id).any():
            row, shown_all[0] = row[:int(np.flatnonzero(row == eos_id)[0])], True
        write(row)

    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    if beams > 1:  # the best beam is known only at the end: shown then
        tokens = beam_search(
            config, params, rows, num_beams=beams, max_new_tokens=FLAGS.max_new_tokens, rng=jax.random.key(FLAGS.seed),
            eos_id=eos_id, pad_id=pad_id, lsh_rotations=model.lsh_rotations)
        show(tokens)
    else:
        tokens = generation.generate(
            config, params, rows, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
            top_k=FLAGS.top_k, top_p=FLAGS.top_p, greedy=FLAGS.greedy, rng=jax.random.key(FLAGS.seed),
            lsh_rotations=model.lsh_rotations, on_tokens=show, stream_every=max(1, FLAGS.stream_every),
            eos_id=eos_id, pad_id=pad_id)
    write.finish()
    stopped = eos_id is not None and eos_id in tokens[0]
    seconds = time.perf_counter() - started
    print()
    made = int(np.flatnonzero(tokens[0] == eos_id)[0]) + 1 if stopped else FLAGS.max_new_tokens
    print(f"=== {made} tokens{' (stopped at the end-of-sequence id)' if stopped else ''} in {seconds:.1f} s, "
          f"compilation included ({made / seconds:.1f} tokens/s) ===", file=sys.stderr)
    return 0


def main(argv) -> int:
    from reformer_jax.decoding.generation import GenerateError

    logging.set_verbosity(logging.ERROR)  # orbax logs reads at INFO and WARNING level
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    try:
        return run()
    except (LoadError, GenerateError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from reformer_jax import cli

    cli.run(main)
