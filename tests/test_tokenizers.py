"""Tokenizers: the byte tokenizers' ids, and a sentencepiece model against Hugging Face's ReformerTokenizer.

The sentencepiece model is trained here (the `sentencepiece` trainer, BPE, as crime-and-punishment's
`spiece.model` is read by Hugging Face) on a few KB of text, unicode included; ids and decoded text must equal
`transformers.ReformerTokenizer`'s, which reads the same file. Under CI=true a missing package fails the module.
"""

import importlib
import io
import os

import pytest

from reformer_jax import tokenizers

_load = importlib.import_module if os.environ.get("CI") == "true" else pytest.importorskip

STRINGS = ["Hello, world.", "Crime and Punishment", "  two  spaces  ", "tab\tand\nnewline", "ünïcödé", "日本語のテキスト",
           "emoji 🎉 party", "Ελληνικά γράμματα", "Raskolnikov's axe", "", "a", "123 456 7890", "mixed: ü, 日, ε!",
           "THE END", "punctuation?!;:", "he said \"no\"", "line\r\nbreak", "long " * 20, "naïve café",
           "Rodion Romanovich Raskolnikov"]


def test_byte_tokenizers_offset_their_ids_and_drop_specials():
    assert tokenizers.BYTES.encode("A").tolist() == [65 + 3] and tokenizers.BYTES.vocab_size == 259
    assert tokenizers.ENWIK8_BYTES.encode("A").tolist() == [65 + 2] and tokenizers.ENWIK8_BYTES.vocab_size == 258
    assert tokenizers.ENWIK8_BYTES.decode([0, 1, 67, 2 + 0xC3, 2 + 0xBC]) == "Aü"
    assert tokenizers.from_dict(tokenizers.ENWIK8_BYTES.to_dict()) == tokenizers.ENWIK8_BYTES
    assert tokenizers.for_hf_vocabulary(258) == tokenizers.ENWIK8_BYTES and tokenizers.for_hf_vocabulary(320) is None


def test_stream_decoding_equals_decoding_all_ids():
    ids = tokenizers.BYTES.encode("ünïcödé ✓ 日本語")
    stream = tokenizers.BYTES.stream_decoder()
    text = "".join(stream(ids[i:i + 3]) for i in range(0, len(ids), 3)) + stream([], final=True)
    assert text == tokenizers.BYTES.decode(ids)


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    spm = _load("sentencepiece")
    lines = [s * 3 for s in STRINGS if s.strip()] * 4 + open(__file__, encoding="utf-8").read().splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=320,
                                   model_type="bpe", character_coverage=1.0, pad_id=-1, unk_id=0, bos_id=-1,
                                   eos_id=1, minloglevel=2)
    directory = tmp_path_factory.mktemp("spiece")
    (directory / "spiece.model").write_bytes(model.getvalue())
    return directory


def test_sentencepiece_ids_and_text_equal_hugging_faces(spiece):
    """Equal ids and text, except where Hugging Face's converted tokenizer keeps a trailing space that sentencepiece
    itself drops (a lone "▁" piece at the end): there ours are sentencepiece's own, the library the vocabulary was
    built with."""
    spm = _load("sentencepiece")
    transformers = _load("transformers")
    theirs = transformers.ReformerTokenizer.from_pretrained(str(spiece))
    reference = spm.SentencePieceProcessor(model_file=str(spiece / "spiece.model"))
    ours = tokenizers.SentencePieceTokenizer((spiece / "spiece.model").read_bytes())
    assert ours.vocab_size == 320 and ours.eos_id == theirs.eos_token_id
    trailing_space = [text for text in STRINGS if text != text.rstrip(" ")]
    assert len(trailing_space) == 2
    for text in STRINGS:
        ids = theirs.encode(text, add_special_tokens=False)
        got = ours.encode(text).tolist()
        if text in trailing_space:
            assert got == reference.encode(text) and ids == got + [reference.piece_to_id("\u2581")], text
        else:
            assert got == ids, text
        assert ours.decode(ids) == theirs.decode(ids), text
        assert ours.decode(ids + [ours.eos_id]) == theirs.decode(ids + [ours.eos_id], skip_special_tokens=True)
    unknown = [0, 5, 0]  # the unknown piece reads "<unk>" in both
    assert ours.decode(unknown) == theirs.decode(unknown)


def test_sentencepiece_record_is_complete_and_streams_as_it_decodes(spiece):
    _load("sentencepiece")
    ours = tokenizers.SentencePieceTokenizer((spiece / "spiece.model").read_bytes())
    again = tokenizers.from_dict(ours.to_dict())
    ids = ours.encode("Rodion Romanovich, ünïcödé and 日本語")
    assert again.encode("Rodion Romanovich").tolist() == ours.encode("Rodion Romanovich").tolist()
    stream = ours.stream_decoder()
    assert "".join(stream(ids[i:i + 2]) for i in range(0, len(ids), 2)) == ours.decode(ids)
