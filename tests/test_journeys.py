"""README.md's journeys as a user types them: every shell command in its ```bash blocks runs as typed, with the
defaults, in a scratch copy of the working tree.

Commands that read what an earlier one wrote form a chain (the training run and the tools that read its workdir;
the Hugging Face conversion and what reads the converted directory; ...); a chain's commands run in README order in
one scratch copy, and chains, which share nothing, run as separate tests. The only change to a command is a smaller
`--steps=` appended to a training job (a later flag wins). A command that cannot run here is listed in NOT_RUN with
the reason; a new README command that is neither run nor listed fails `test_every_readme_command_is_run_or_listed`.

`reformer-enwik8/` and `reformer-crime-and-punishment/` are the inputs a reader brings (downloads of the
pretrained checkpoints): here they are small models saved by transformers' `save_pretrained` in those layouts
(vocabulary 258, byte b = token b + 2; a sentencepiece vocabulary of 320 in spiece.model), and what our tools print
is checked against what PyTorch computes with them, decoded by their own tokenizers.
"""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STEPS = 1  # appended to every training command: a checkpoint, a validation and a sample at step 1
CPU_DEFAULT_DEVICES = "devices: 2 (cpu), mesh data:1,fsdp:1,tensor:2"  # main.py's header line on a 2-core CPU

# Commands not run here, by their leading words, with the reason.
NOT_RUN = {
    "pip install": "installs packages: .ci/run makes exactly this install before it runs the suite",
    "python -m pytest": "the test suite itself (this test is part of it)",
}


def chain_of(command: str) -> str:
    """Which chain a README command belongs to: the commands that read what it writes are in the same one."""
    if "enwik8" in command or "crime" in command:
        return "hf"
    if "--compile_only" in command:
        return "tpu"
    if "--host_devices" in command or "--mesh=" in command:
        return "mesh"
    if "--dataset=synthetic" in command:
        return "copy"
    if "--task=" in command or "runs/listops" in command or "runs/mlm" in command:
        return "encoders"
    return "train"


def readme_commands():
    """[(line number, argv)] of every command in README.md's ```bash blocks, in order (`a && b` is two)."""
    commands, in_block = [], False
    lines = README.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_block = line.strip() == "```bash" if not in_block else False
            continue
        if not in_block or not line.strip():
            continue
        words = shlex.split(line, comments=True)
        while "&&" in words:
            cut = words.index("&&")
            commands.append((number, words[:cut]))
            words = words[cut + 1:]
        if words:
            commands.append((number, words))
    return commands


def not_run_reason(argv):
    text = " ".join(argv)
    return next((reason for start, reason in NOT_RUN.items() if text.startswith(start)), None)


def is_training(argv) -> bool:
    return argv[:2] == ["python", "main.py"] and not {"--help", "--compile_only"} & set(argv)


def run_as_typed(argv, cwd: Path) -> subprocess.CompletedProcess:
    # The commands of a chain share JAX's persistent compilation cache (as --compilation_cache_dir would): a step
    # compiled by one command is loaded by the next. The commands themselves are as typed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_COMPILATION_CACHE_DIR=str(cwd / ".jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):  # VAR=value python ...
        name, _, value = argv[0].partition("=")
        env[name], argv = value, argv[1:]
    assert argv[0] == "python", argv
    argv = [sys.executable, *argv[1:]] + ([f"--steps={STEPS}"] if is_training(argv) else [])
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=900)
    # Decoded without newline translation: a generated "\r" stays one.
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode("utf-8", "replace"),
                                       result.stderr.decode("utf-8", "replace"))


def test_every_readme_command_is_run_or_listed():
    commands = readme_commands()
    assert len(commands) >= 15, commands  # the parser found the blocks
    for number, argv in commands:
        assert not_run_reason(argv) or argv[0] == "python", (
            f"README.md:{number}: {' '.join(argv)} is neither run by this test nor listed in NOT_RUN with a reason")
    run = [argv for _, argv in commands if not not_run_reason(argv)]
    assert {chain_of(" ".join(argv)) for argv in run} == set(CHAINS)


def scratch_copy(tmp_path: Path) -> Path:
    """The working tree as a user's clone has it (tracked and untracked, not ignored, files)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    scratch = tmp_path / "clone"
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, scratch / name)
    return scratch


# --- what each chain's commands must show, beyond exit status 0 ---------------------------------------------------

def check_train(argv, result, scratch):
    text = " ".join(argv)
    if argv[1:3] == ["-m", "reformer_jax.evaluate"]:  # the run's own validation split, as training scored it
        evaluation = json.loads((scratch / "runs/default/summary.json").read_text())["evaluations"][-1]
        logged = [json.loads(line) for line in (scratch / "runs/default/metrics.jsonl").read_text().splitlines()]
        at_step = [row["val_bpc"] for row in logged if row["step"] == evaluation["step"] and "val_bpc" in row]
        assert evaluation["data"].startswith("validation split of tiny Shakespeare"), evaluation
        assert at_step and math.isclose(evaluation["bpc"], at_step[0], rel_tol=1e-6), (evaluation, at_step)
    elif argv[1:3] == ["-m", "reformer_jax.generate"]:
        continuation = result.stdout.split("=== generated ===\n", 1)[1]
        assert len(continuation.strip()) > 0, result.stdout
    elif argv[1:3] == ["-m", "reformer_jax.plot"]:
        assert (scratch / "curves.png").stat().st_size > 10_000
    elif "--init_from=runs/default" in text:
        settings = json.loads((scratch / "runs/readme/run_settings.json").read_text())
        assert settings["data"]["kind"] == "file" and settings["data"]["path"] == str(scratch / "README.md")
        assert settings["tokenizer"]["offset"] == 3
        assert "parameters from" in result.stdout and "runs/default/checkpoints" in result.stdout
        # Reading the source run leaves the device choice open: fine-tuning gets main.py's CPU default too.
        assert CPU_DEFAULT_DEVICES in result.stdout, result.stdout
    elif text == "python main.py --model=reformer --n_hashes=4":  # typed twice: the second time, nothing to do
        out = result.stdout
        if "nothing to train" in out:
            assert out.strip().count("\n") == 0 and f"is at step {STEPS}" in out, out
            return
        assert CPU_DEFAULT_DEVICES in out and "the CPU default" in out, out
        assert "memory (compile-time, per device): peak" in out and "validation loss" in out, out
        assert f"done: steps 1-{STEPS} in" in out and "sample:" in out, out
        assert (scratch / "runs/default/metrics.jsonl").read_text().count("\n") == STEPS


def check_encoders(argv, result, scratch):
    text = " ".join(argv)
    if argv[1:3] == ["-m", "reformer_jax.evaluate"] and "runs/listops" in text:  # held-out examples, by accuracy
        evaluation = json.loads((scratch / "runs/listops/summary.json").read_text())["evaluations"][-1]
        assert evaluation["data"].startswith("the first 25 batches of the test split of ListOps"), evaluation
        assert evaluation["tokens"] == 200 and "accuracy" in result.stdout, (evaluation, result.stdout)
    elif argv[1:3] == ["-m", "reformer_jax.evaluate"]:  # the masked-LM run's validation, as training scored it
        evaluation = json.loads((scratch / "runs/mlm/summary.json").read_text())["evaluations"][-1]
        logged = [json.loads(line) for line in (scratch / "runs/mlm/metrics.jsonl").read_text().splitlines()]
        at_step = [row["val_loss"] for row in logged if row["step"] == evaluation["step"] and "val_loss" in row]
        assert at_step and math.isclose(evaluation["loss"], at_step[0], rel_tol=1e-6), (evaluation, at_step)
    else:  # training: a bidirectional model, its validation by accuracy, no text sample
        assert "validation loss" in result.stdout and "accuracy" in result.stdout, result.stdout
        assert "sample:" not in result.stdout, result.stdout
        workdir = "runs/listops" if "--task=classify" in text else "runs/mlm"
        model = json.loads((scratch / workdir / "run_settings.json").read_text())["model"]
        assert model["causal"] is False and model["n_chunks_after"] == 1, model
        assert model["head"] == ("classification" if "--task=classify" in text else "lm"), model


def check_mesh(argv, result, scratch):
    if "--host_devices=8" in argv:
        assert "devices: 8 (cpu), mesh data:2,fsdp:2,tensor:2" in result.stdout, result.stdout


def check_tpu(argv, result, scratch):
    assert "fits:" in result.stdout, result.stdout


def check_copy(argv, result, scratch):
    assert json.loads((scratch / "runs/copy/run_settings.json").read_text())["tokenizer"] is None


# The pretrained checkpoints' layer mix (local, then LSH) at a small size; hash_seed fixes Hugging Face's hash
# rotations, which the conversion records, so PyTorch and we hash alike. Weights drawn wider than Hugging Face's
# default (0.02) make the rotations matter: with another hash_seed 15-23 of the first 200 greedy enwik8 tokens
# change, and generate's check fails when the reader drops the recorded rotations. The README's loss moves less
# (3e-5 relative with rotations of our own), inside evaluate's 1e-4: tests/test_convert_hf.py checks that the loss
# follows the recorded rotations.
STAND_IN = dict(hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=32,
                initializer_range=0.3, attn_layers=["local", "lsh"], local_attn_chunk_length=64,
                local_num_chunks_before=1, lsh_attn_chunk_length=64, lsh_num_chunks_before=1, num_buckets=4,
                num_hashes=2, hash_seed=5, axial_pos_embds=True, axial_pos_shape=[64, 64], axial_pos_embds_dim=[8, 8],
                max_position_embeddings=4096, is_decoder=True, hidden_act="relu", hidden_dropout_prob=0.0,
                local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0)
ENWIK8_STAND_IN = dict(STAND_IN, vocab_size=258, pad_token_id=0, eos_token_id=None)
CRIME_STAND_IN = dict(STAND_IN, vocab_size=320, pad_token_id=0, eos_token_id=1)


def _peer(name):
    return __import__(name) if os.environ.get("CI") == "true" else pytest.importorskip(name)


def hf_stand_ins(scratch: Path):
    """Small ReformerModelWithLMHead models saved as a reader's downloads are: `reformer-enwik8/` (vocabulary 258,
    byte b = token b + 2) and `reformer-crime-and-punishment/` (a sentencepiece vocabulary of 320, trained here on
    this repository's README, saved as its spiece.model). A local and an LSH layer each, with a fixed hash_seed:
    the conversion records Hugging Face's hash rotations, and generate and evaluate hash with them. Returns
    (torch, {name: (model, encode, decode)})."""
    torch, transformers, spm = _peer("torch"), _peer("transformers"), _peer("sentencepiece")
    models = {}
    for name, config in (("enwik8", ENWIK8_STAND_IN), ("crime", CRIME_STAND_IN)):
        torch.manual_seed(0)
        models[name] = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**config)).eval()
    models["enwik8"].save_pretrained(scratch / "reformer-enwik8")
    crime = scratch / "reformer-crime-and-punishment"
    models["crime"].save_pretrained(crime)
    import io

    vocabulary = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(README.read_text().splitlines()), model_writer=vocabulary,
                                   vocab_size=320, model_type="bpe", character_coverage=1.0, pad_id=-1, unk_id=0,
                                   bos_id=-1, eos_id=1, minloglevel=2)
    (crime / "spiece.model").write_bytes(vocabulary.getvalue())
    pieces = transformers.ReformerTokenizer.from_pretrained(str(crime))
    return torch, {
        "enwik8": (models["enwik8"], lambda text: [b + 2 for b in text.encode("utf-8")],
                   lambda ids: bytes(i - 2 for i in ids if i >= 2).decode("utf-8", errors="replace")),
        "crime": (models["crime"], lambda text: pieces.encode(text, add_special_tokens=False),
                  lambda ids: pieces.decode([i for i in ids if i != pieces.eos_token_id])),
    }


def check_hf(argv, result, scratch, torch, models):
    text = " ".join(argv)
    name = "crime" if "crime" in text else "enwik8"
    model, encode, decode = models[name]
    if argv[1:3] == ["-m", "reformer_jax.generate"]:
        prompt = next(a.split("=", 1)[1] for a in argv if a.startswith("--prompt="))
        n_new = 200  # generate's default --max_new_tokens
        # Hugging Face's greedy generate to its end-of-sequence id, cached as by default (and as reformer_jax
        # decodes): uncached, it hashes the whole sequence at each step and parts from it after ~80 tokens here.
        with torch.no_grad():
            ids = model.generate(torch.tensor([encode(prompt)]), max_new_tokens=n_new, do_sample=False,
                                 use_cache=True, pad_token_id=0)
        assert ids.shape[1] - len(encode(prompt)) >= 64, ids  # a continuation long enough to cross chunks
        expected = decode(ids[0, len(encode(prompt)):].tolist())
        continuation = result.stdout.split("=== generated ===\n", 1)[1]
        assert continuation.rstrip("\n") == expected.rstrip("\n"), (continuation, expected)
    elif argv[1:3] == ["-m", "reformer_jax.evaluate"]:
        tokens = encode((scratch / "README.md").read_text())
        windows = [tokens[i:i + 4097] for i in range(0, len(tokens) - 1, 4096)]  # consecutive; the last one short
        assert len(windows[-1]) < 4097  # (PyTorch pads it to a multiple of the chunk length itself)
        with torch.no_grad():  # every target once, in float64 from PyTorch's logits
            nats = sum(float(torch.nn.functional.cross_entropy(model(torch.tensor([w[:-1]])).logits[0].double(),
                                                               torch.tensor(w[1:]), reduction="sum"))
                       for w in windows)
        expected_bpc = nats / (len(tokens) - 1) / math.log(2)
        printed = float(re.search(r"([0-9.]+) bits per character", result.stdout).group(1))
        assert printed == pytest.approx(expected_bpc, rel=1e-4), (printed, expected_bpc)  # printed to 4 decimals
    elif argv[1:3] == ["main.py", "--init_from=converted/enwik8"]:
        settings = json.loads((scratch / "runs/enwik8/run_settings.json").read_text())
        assert settings["tokenizer"]["offset"] == 2 and settings["data"]["kind"] == "packaged", settings
    elif "reformer_jax.convert" in text:
        record = json.loads((scratch / "converted" / name / "tokenizer.json").read_text())
        assert record["kind"] == ("sentencepiece" if name == "crime" else "bytes"), record
        assert name == "crime" or record["offset"] == 2
        assert (scratch / "converted" / name / "lsh_rotations.npy").is_file(), result.stdout  # hash_seed: recorded


CHAINS = {"train": check_train, "copy": check_copy, "mesh": check_mesh, "tpu": check_tpu, "hf": check_hf,
          "encoders": check_encoders}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_readme_commands_run_as_typed(chain, tmp_path):
    scratch = scratch_copy(tmp_path)
    extra = ()
    if chain == "hf":
        extra = hf_stand_ins(scratch)
    if chain == "tpu":
        from reformer_jax.xla import tpu

        if not tpu.libtpu_available() and os.environ.get("CI") != "true":
            pytest.skip("libtpu is not installed (requirements-tpu.txt)")
    ran = 0
    for number, argv in readme_commands():
        if not_run_reason(argv) or chain_of(" ".join(argv)) != chain:
            continue
        result = run_as_typed(list(argv), scratch)
        where = f"README.md:{number}: {' '.join(argv)}"
        assert result.returncode == 0, (f"{where} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                        f"{result.stderr[-3000:]}")
        CHAINS[chain](argv, result, scratch, *extra)
        ran += 1
    assert ran >= 1
