"""Beam search on the cached decoder gives Hugging Face's `generate(num_beams=4, do_sample=False, use_cache=True)`:
the same tokens and scores, with and without an end-of-sequence id that finishes hypotheses early.

Skipped unless torch and transformers are installed, except under CI (CI=true), where a missing peer fails the
module. Random-weight models: one local-only, one mixing local and LSH layers with a fixed hash_seed (its one draw
of rotations is recorded and handed to our decoding, as in test_decoding_hf.py). Prompts of 5 and 13 tokens (local)
and 11 (mixed), none a multiple of the chunk length, 8.

Two things of Hugging Face's are set aside. Its Reformer drops the attention mask in generate, so it cannot
continue a padded batch: its beam searches here are one prompt each, and our batch of two prompts of different
lengths must give each prompt's. Its cached LSH attention reads the first row's past for every row of a batch (so
every beam of a search reads the first beam's): the reference calls that lookup row by row (`row_by_row`).
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_load = importlib.import_module if os.environ.get("CI") == "true" else pytest.importorskip
torch = _load("torch")
transformers = _load("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from reformer_jax.decoding import GenerateError, beam_search  # noqa: E402
from reformer_jax.decoding.beam_search import beam_search_compilations  # noqa: E402
from reformer_jax.model.config import ModelConfig  # noqa: E402
from reformer_jax.model.hf_convert import from_hf  # noqa: E402

# One worker: the cases of a model share its compiled prefills and beam loop.
pytestmark = pytest.mark.xdist_group("test_beam_search")

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64, vocab_size=30,
            lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_hashes=2, num_buckets=4, is_decoder=True,
            axial_pos_shape=(8, 16), axial_pos_embds_dim=(16, 16), max_position_embeddings=128,
            hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
            pad_token_id=0, eos_token_id=2, hash_seed=7,
            # Weights 10x the default spread: what a beam continues with then depends on its own history, so a beam
            # continued from another's caches picks other tokens (at the default, near-uniform outputs hide it).
            initializer_range=0.2)
LAYERS = {"local": ["local", "local"], "mixed": ["local", "lsh", "local", "lsh"]}
BEAMS, NEW_TOKENS = 4, 32
# None a multiple of the chunk length (8). The local-only model prefills both at one padded length; the mixed
# model's prompt pads to two chunks, which its prefill hashes (one shorter than a chunk: tests/test_decoding_hf.py).
PROMPT_LENGTHS = {"local": (5, 13), "mixed": (11,)}
EOS = 6  # finishes the best hypothesis of both prompts of both models before NEW_TOKENS (asserted)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch's generate on these tiny models: one thread is many times faster on a busy 2-core machine (its
    threads wait on each other for every small operation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt_of(length):
    return np.random.default_rng(length).integers(3, BASE["vocab_size"], length)


def row_by_row(lookup):
    """Hugging Face's cached LSH attention gathers the past hidden states of a batch's rows at offset 0 (its batch
    offset is always 0): every row, every beam, reads the first row's past. Its lookup called for each row on its own
    is its batch-of-one behaviour, which our decoding matches (tests/test_decoding_hf.py)."""

    def each_row(self, query_vectors, attention_mask, num_hashes, hidden_states, past_states, past_buckets):
        rows = [lookup(self, query_vectors[i:i + 1], None if attention_mask is None else attention_mask[i:i + 1],
                       num_hashes, hidden_states[i:i + 1], past_states[i:i + 1], past_buckets[i:i + 1])
                for i in range(hidden_states.shape[0])]
        return tuple(torch.cat(parts) for parts in zip(*rows))

    return each_row


class HuggingFace:
    """A random-weight ReformerModelWithLMHead, converted, with its hash rotations and its beam searches."""

    def __init__(self, name, monkeypatch):
        torch.manual_seed(0)
        self.model = transformers.ReformerModelWithLMHead(
            transformers.ReformerConfig(**BASE, attn_layers=LAYERS[name])).float().eval()
        self.draws, original = [], torch.randn

        def recording(*args, dtype=None, **kwargs):
            out = original(*args, **kwargs)
            self.draws.append(out.detach().numpy().copy())
            return out if dtype is None else out.to(dtype)

        monkeypatch.setattr(torch, "randn", recording)
        lsh = transformers.models.reformer.modeling_reformer.LSHSelfAttention
        monkeypatch.setattr(lsh, "_get_relevant_hid_states_and_buckets",
                            row_by_row(lsh._get_relevant_hid_states_and_buckets))
        self.config, self.params = from_hf(self.model.state_dict(), self.model.config.to_dict())
        self.n_lsh, self.prompt_lengths = LAYERS[name].count("lsh"), PROMPT_LENGTHS[name]
        self._results = {}

    def beam_search(self, length, eos, num_beams=BEAMS):
        """Hugging Face's (new tokens, score) for prompt_of(length): the generated part, as long as it made it (with
        num_beams=1, greedy decoding, no score)."""
        if (length, eos, num_beams) not in self._results:
            with torch.no_grad():
                out = self.model.generate(torch.from_numpy(prompt_of(length)[None]), num_beams=num_beams,
                                          do_sample=False, max_new_tokens=NEW_TOKENS, use_cache=True, eos_token_id=eos,
                                          pad_token_id=0, return_dict_in_generate=True, output_scores=True)
            score = float(out.sequences_scores[0]) if num_beams > 1 else None
            self._results[length, eos, num_beams] = out.sequences.numpy()[0, length:], score
        return self._results[length, eos, num_beams]

    def rotations(self):
        if not self.n_lsh:
            return None
        assert self.draws and all(np.array_equal(d, self.draws[0]) for d in self.draws)  # hash_seed: one draw
        return jnp.asarray(np.stack([self.draws[0]] * self.n_lsh))


@pytest.fixture(scope="module")
def local():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield HuggingFace("local", monkeypatch)


@pytest.fixture(scope="module")
def mixed():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield HuggingFace("mixed", monkeypatch)


@pytest.fixture(params=sorted(LAYERS))
def hf(request):
    return request.getfixturevalue(request.param)


def ours(hf, prompts, eos, **kwargs):
    kwargs = {"num_beams": BEAMS, "max_new_tokens": NEW_TOKENS, **kwargs}
    return beam_search(hf.config, hf.params, prompts, rng=jax.random.key(0), eos_id=eos, pad_id=0,
                       lsh_rotations=hf.rotations(), return_scores=True, **kwargs)


@pytest.mark.parametrize("eos", [None, EOS], ids=["no-eos", "eos"])
def test_beam_search_matches_hugging_face(hf, eos):
    compiled = beam_search_compilations()
    for length in hf.prompt_lengths:
        expected, expected_score = hf.beam_search(length, eos)
        tokens, scores = ours(hf, [prompt_of(length)], eos)
        if eos is None:
            assert len(expected) == NEW_TOKENS
        else:  # the eos finished the answer early
            assert len(expected) < NEW_TOKENS and expected[-1] == eos and eos not in expected[:-1]
        np.testing.assert_array_equal(tokens[0, :len(expected)], expected)
        assert (tokens[0, len(expected):] == 0).all()  # padded after the eos
        assert abs(scores[0] - expected_score) <= 1e-4 * abs(expected_score), (scores[0], expected_score)
    assert beam_search_compilations() <= compiled + 1  # one beam loop serves every prompt length and eos setting


def test_a_batch_of_prompts_of_different_lengths_gives_each_prompts_answer(local):
    """Each prompt stops improving at its own step; the batch decodes on until both have. (The local-only model:
    rows of different lengths decode independently in either model, tests/test_decoding.py.)"""
    hf = local
    tokens, scores = ours(hf, [prompt_of(n) for n in hf.prompt_lengths], EOS)
    for row, length in enumerate(hf.prompt_lengths):
        expected, expected_score = hf.beam_search(length, EOS)
        np.testing.assert_array_equal(tokens[row, :len(expected)], expected)
        assert (tokens[row, len(expected):] == 0).all()
        assert abs(scores[row] - expected_score) <= 1e-4 * abs(expected_score)


def test_one_beam_is_greedy_decoding(local):
    """num_beams=1 is Hugging Face's generate(num_beams=1): greedy decoding, stopping at the eos."""
    hf = local
    for length in hf.prompt_lengths:
        greedy = hf.beam_search(length, None, num_beams=1)[0]
        eos = int(greedy[6])  # a token the greedy continuation emits early
        stopped = hf.beam_search(length, eos, num_beams=1)[0]
        assert len(stopped) <= 7 and stopped[-1] == eos
        for expected, stop in ((greedy, None), (stopped, eos)):
            tokens = ours(hf, [prompt_of(length)], stop, num_beams=1)[0][0]
            np.testing.assert_array_equal(tokens[:len(expected)], expected)
            assert (tokens[len(expected):] == 0).all()


@pytest.mark.parametrize("arguments,named", [
    (dict(num_beams=0), "num_beams=0 is invalid"), (dict(num_beams=2.0), "num_beams=2.0 is invalid"),
    (dict(eos_id=30), "eos_id=30 is outside"), (dict(max_new_tokens=120), "max_len=128"),
])
def test_bad_arguments_are_refused_in_one_line(arguments, named):
    config = ModelConfig(attention="full", d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=128, vocab_size=30)
    arguments = {"num_beams": BEAMS, "max_new_tokens": 4, **arguments}
    with pytest.raises(GenerateError, match=named) as error:  # params=None: refused before the model is read
        beam_search(config, None, [prompt_of(13)], rng=jax.random.key(0), **arguments)
    assert "\n" not in str(error.value)


# --- the command line ---------------------------------------------------------------------------------------------

# google/reformer-enwik8's layout (byte b is token b + 2), small; convert records the LSH layer's rotations (hash_seed).
ENWIK8_LIKE = dict(BASE, vocab_size=258, attn_layers=["local", "lsh"], eos_token_id=None)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random enwik8-like model saved by save_pretrained and converted by the command line."""
    root = tmp_path_factory.mktemp("beam_cli")
    torch.manual_seed(1)
    model = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**ENWIK8_LIKE)).float().eval()
    model.save_pretrained(root / "hf")
    result = subprocess.run([sys.executable, "-m", "reformer_jax.convert", f"--hf_dir={root / 'hf'}",
                             f"--out={root / 'converted'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return model, root / "converted"


def run_generate(directory, *flags):
    result = subprocess.run([sys.executable, "-m", "reformer_jax.generate", f"--init_from={directory}", *flags],
                            cwd=ROOT, capture_output=True, timeout=300)
    # Decoded without newline translation: a generated "\r" stays one.
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode("utf-8", "replace"),
                                       result.stderr.decode("utf-8", "replace"))


def test_the_command_line_prints_hugging_faces_beam_search(converted, monkeypatch):
    model, directory = converted
    lsh = transformers.models.reformer.modeling_reformer.LSHSelfAttention
    monkeypatch.setattr(lsh, "_get_relevant_hid_states_and_buckets", row_by_row(lsh._get_relevant_hid_states_and_buckets))
    prompt, new = "Beam search", 24
    ids = [b + 2 for b in prompt.encode()]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), num_beams=BEAMS, do_sample=False, max_new_tokens=new,
                                  use_cache=True, pad_token_id=0).numpy()[0, len(ids):]
    text = bytes(int(i) - 2 for i in expected if i >= 2).decode("utf-8", errors="replace")
    result = run_generate(directory, f"--prompt={prompt}", f"--num_beams={BEAMS}", f"--max_new_tokens={new}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"beam search, {BEAMS} beams" in result.stderr
    assert result.stdout.split("=== generated ===\n", 1)[1] == text + "\n"


@pytest.mark.parametrize("flags,message", [
    (["--num_beams=0"], "--num_beams=0 is invalid: expected a positive integer"),
    (["--num_beams=4", "--top_k=5"], "--num_beams=4 searches for the most likely continuation and does not sample: "
                                      "drop --top_k=5"),
])
def test_the_command_line_refuses_a_bad_num_beams_in_one_line(converted, flags, message):
    result = run_generate(converted[1], "--prompt=The ", *flags)
    assert result.returncode == 1 and result.stdout == ""  # before anything is loaded or compiled
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
