"""Convert a Hugging Face Reformer checkpoint for reformer_jax, from the command line or from Python.

    python -m reformer_jax.convert --hf_dir=DIR --out=OUT    # DIR: config.json + model.safetensors or
                                                             #      pytorch_model.bin (+ spiece.model)
    python -m reformer_jax.convert --hf_id=google/reformer-enwik8 --out=OUT   # fetched (needs a network)
    python main.py --init_from=OUT ...                       # train or fine-tune from the converted weights

A checkpoint whose config sets `hash_seed` gets Hugging Face's fixed LSH hash rotations recorded beside it
(lsh_rotations.npy, computed with torch), which generate and evaluate then use. The conversion itself lives in
`reformer_jax.model.hf_convert`; its public functions are re-exported here.
"""

from __future__ import annotations

import sys
from pathlib import Path

from reformer_jax.model.hf_convert import (ConversionError, config_from_fields, config_from_hf, from_hf,
                                           hf_lsh_rotations, load_converted_config, load_converted_params,
                                           load_converted_rotations, load_converted_tokenizer, load_hf_dir,
                                           save_converted, tokenizer_for_hf)

__all__ = ["ConversionError", "config_from_fields", "config_from_hf", "convert_dir", "from_hf", "hf_lsh_rotations",
           "load_converted_config", "load_converted_params", "load_converted_rotations", "load_converted_tokenizer",
           "load_hf_dir", "save_converted", "tokenizer_for_hf"]


HF_FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "spiece.model"]


def fetch_hf(hf_id: str) -> Path:
    """The files of Hugging Face model `hf_id` (config, weights, sentencepiece vocabulary), fetched with
    huggingface_hub into its cache; ConversionError in one line where they cannot be fetched."""
    try:
        import huggingface_hub
    except ImportError as error:
        raise ConversionError(f"--hf_id={hf_id} needs huggingface_hub (pip install \".[hf]\"); or download the "
                              "model yourself and pass --hf_dir=DIR.") from error
    try:
        return Path(huggingface_hub.snapshot_download(hf_id, allow_patterns=HF_FILES))
    except Exception as error:  # no network, an unknown id, a gated model: the hub's own exception types vary
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ConversionError(f"--hf_id={hf_id} cannot be fetched here ({type(error).__name__}: {reason}); download "
                              "it where a network exists (config.json, model.safetensors or pytorch_model.bin, "
                              "spiece.model) and pass --hf_dir=DIR.") from error


def convert_dir(hf_dir: Path, out: Path) -> str:
    """Convert the Hugging Face Reformer in `hf_dir` into the new directory `out`; returns a one-line summary.

    A config with hash_seed gets Hugging Face's hash rotations recorded (`hf_lsh_rotations`); without torch they
    cannot be computed, and a one-line note on stderr says so (the conversion goes on without them). Raises
    ConversionError naming what it cannot convert."""
    state_dict, hf_config = load_hf_dir(hf_dir)
    config, params = from_hf(state_dict, hf_config)
    tokenizer = tokenizer_for_hf(hf_config, hf_dir)
    try:
        rotations = hf_lsh_rotations(hf_config)
    except ImportError:  # the draw is torch's own generator: without torch it cannot be reproduced
        rotations = None
        print(f"note: hash_seed={hf_config.get('hash_seed')} fixes Hugging Face's LSH hash rotations, but they "
              "cannot be reproduced without torch (pip install torch); converted without them, so generate and "
              "evaluate will draw their own.", file=sys.stderr)
    save_converted(config, params, out, tokenizer=tokenizer, lsh_rotations=rotations)
    return (f"converted {hf_dir} -> {out}: {config.n_layers} layers {list(config.layer_types)}, d_model "
            f"{config.d_model}, vocab {config.vocab_size}, max_len {config.max_len}, tokenizer "
            f"{tokenizer.name if tokenizer else 'none (ids only)'}"
            + (f", Hugging Face's hash rotations (hash_seed {hf_config['hash_seed']})" if rotations is not None
               else ""))


def main(argv) -> int:
    from absl import flags, logging

    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # orbax logs every write at INFO level
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.hf_dir) == bool(FLAGS.hf_id) or not FLAGS.out:
        print("error: pass --out=DIR and one of --hf_dir=DIR (a directory as save_pretrained writes it) and "
              "--hf_id=google/reformer-enwik8 (fetched with huggingface_hub).", file=sys.stderr)
        return 2
    try:
        hf_dir = Path(FLAGS.hf_dir) if FLAGS.hf_dir else fetch_hf(FLAGS.hf_id)
        print(convert_dir(hf_dir, Path(FLAGS.out)))
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from absl import flags

    from reformer_jax import cli

    flags.DEFINE_string("hf_dir", None, "A Hugging Face Reformer directory as save_pretrained writes it (config.json; "
                        "model.safetensors or pytorch_model.bin; spiece.model when the vocabulary is sentencepiece).")
    flags.DEFINE_string("hf_id", None, "A Hugging Face model id (e.g. google/reformer-enwik8) to fetch with "
                        "huggingface_hub instead of --hf_dir (needs a network).")
    flags.DEFINE_string("out", None, "Directory to create with config.json and the orbax params.")
    cli.run(main)
