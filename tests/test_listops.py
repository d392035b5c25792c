"""ListOps data: the evaluator on hand-worked expressions, the generator's bounds and labels, determinism, splits,
batches that are a pure function of (seed, step), and the errors for bad arguments."""

import numpy as np
import pytest

from reformer_jax.errors import SettingError
from reformer_jax.training import listops

SMALL = dict(min_length=64, max_length=256)


@pytest.mark.parametrize("text, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 4 7 ]", 4),
    ("[MED 3 1 2 ]", 2),  # odd count: the middle value
    ("[MED 9 0 5 5 1 ]", 5),
    ("[MED 2 5 ]", 3),  # even count: floor of the mean of the two middle values, 3.5 -> 3
    ("[MED 8 1 9 2 ]", 5),  # middle values 2 and 8
    ("[MED 4 5 5 4 ]", 4),  # middle values 4 and 5 -> 4.5 -> 4
    ("[MED 0 1 ]", 0),
    ("[SM 7 8 9 ]", 4),  # 24 mod 10
    ("[SM 5 5 ]", 0),
    ("[SM 9 9 9 9 9 9 9 9 9 9 ]", 0),  # 90 mod 10
    ("[SM [MAX 3 8 ] [MED 9 1 4 ] 6 ]", 8),  # 8 + 4 + 6 = 18
    ("[MIN [SM 9 9 ] [MAX 1 [MED 7 2 ] ] ]", 4),  # MIN(8, MAX(1, 4))
    ("[MAX [MIN [MIN [MIN 9 3 ] 8 ] 7 ] 1 ]", 3),
    ("7", 7),
])
def test_evaluate_hand_worked_examples(text, value):
    assert listops.evaluate(text) == value
    ids = listops.encode(text)
    assert ids[0] == listops.CLS_ID and ids.dtype == np.int32
    assert listops.evaluate(ids) == value  # ids, CLS first
    assert listops.evaluate(np.concatenate([ids, [listops.PAD_ID] * 3])) == value  # padding is skipped
    assert listops.evaluate(text.split()) == value  # token strings
    assert listops.evaluate(listops.parse(text)) == value  # the tree
    assert listops.decode(ids) == text


def test_parse_builds_the_tree():
    assert listops.parse("[MAX 2 9 [MIN 4 7 ] 0 ]") == ("MAX", [2, 9, ("MIN", [4, 7]), 0])
    assert listops.evaluate(("SM", [("MED", [1, 2, 3, 4]), 9])) == 1  # MED = 2 (2.5 floored); 2 + 9 = 11


def test_median_of_any_count_is_numpys_median_floored():
    rng = np.random.default_rng(0)
    for n in range(2, 12):
        for _ in range(20):
            values = rng.integers(0, 10, n).tolist()
            text = "[MED " + " ".join(map(str, values)) + " ]"
            assert listops.evaluate(text) == int(np.floor(np.median(values))), values


@pytest.mark.parametrize("text, match", [
    ("[MAX 1 2", "bracket.*open"),
    ("[MAX 1 2 ] ]", "never opened"),
    ("[MAX ]", "no arguments"),
    ("1 2", "2 top-level terms"),
    ("[FOO 1 2 ]", "not a ListOps token"),
])
def test_malformed_expressions_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        listops.evaluate(text)


def _shape(tree, depth=1):
    """(the deepest digit's depth, the fewest and the most arguments of an operator) of a tree."""
    if not isinstance(tree, tuple):
        return depth, 99, 0
    below = [_shape(a, depth + 1) for a in tree[1]]
    n = len(tree[1])
    return max(b[0] for b in below), min([n] + [b[1] for b in below]), max([n] + [b[2] for b in below])


@pytest.mark.parametrize("bounds", [dict(SMALL), dict(min_length=20, max_length=120, max_depth=4, max_args=4)])
def test_examples_lie_within_bounds_and_labels_are_their_values(bounds):
    tokens, mask, labels = listops.dataset("train", 200, seed=3, **bounds)
    n, width = tokens.shape
    assert (n, width) == (200, bounds["max_length"]) and mask.shape == tokens.shape and labels.shape == (200,)
    assert tokens.dtype == np.int32 and mask.dtype == bool and labels.dtype == np.int32
    lengths = mask.sum(1)
    assert lengths.min() >= bounds["min_length"] and lengths.max() <= bounds["max_length"]
    assert np.array_equal(mask, np.arange(width)[None, :] < lengths[:, None])  # real tokens first, then padding
    assert np.all(tokens[~mask] == listops.PAD_ID) and np.all(tokens[mask] != listops.PAD_ID)
    assert np.all(tokens[:, 0] == listops.CLS_ID) and np.all(tokens[:, 1:][mask[:, 1:]] != listops.CLS_ID)
    max_depth, max_args = bounds.get("max_depth", 10), bounds.get("max_args", 10)
    for row, label in zip(tokens, labels):
        tree = listops.parse(listops.decode(row))  # through the text: the evaluator, not the generator
        assert listops.evaluate(tree) == label
        deepest, fewest, most = _shape(tree)
        assert deepest <= max_depth and 2 <= fewest and most <= max_args
    # target lengths are uniform on the range: the mean within 5 standard errors of the middle
    spread = (bounds["max_length"] - bounds["min_length"]) / np.sqrt(12)
    assert abs(lengths.mean() - (bounds["min_length"] + bounds["max_length"]) / 2) < 5 * spread / np.sqrt(n)


def test_the_depth_limit_is_reached_and_every_class_occurs():
    tokens, _, labels = listops.dataset("train", 200, seed=0, **SMALL)
    assert max(_shape(listops.parse(row))[0] for row in tokens) == 10  # digits at depth 10, the default limit
    assert np.all(np.bincount(labels, minlength=10) > 0)
    assert listops.majority_rate(labels) == np.bincount(labels).max() / len(labels)


def test_an_exact_length_is_met():
    _, mask, _ = listops.dataset("validation", 50, seed=1, min_length=97, max_length=97)
    assert np.all(mask.sum(1) == 97)
    _, mask, _ = listops.dataset("validation", 20, seed=1, min_length=5, max_length=5)  # <cls> [OP d d ]
    assert np.all(mask.sum(1) == 5)


def test_same_arguments_same_bytes_and_a_prefix_does_not_depend_on_the_count():
    first = listops.dataset("test", 40, seed=5, **SMALL)
    listops._split_examples.cache_clear()  # generate again rather than read the cache
    again = listops.dataset("test", 40, seed=5, **SMALL)
    more = listops.dataset("test", 60, seed=5, **SMALL)
    for a, b, c in zip(first, again, more):
        assert a.tobytes() == b.tobytes() and np.array_equal(a, c[:40])
    tokens, length = listops.example("test", 7, seed=5, **SMALL)
    assert np.array_equal(tokens, first[0][7, :len(tokens)]) and length == first[2][7]


def test_splits_and_seeds_draw_different_examples():
    rows = {split: {r.tobytes() for r in listops.dataset(split, 100, seed=0, **SMALL)[0]}
            for split in listops.SPLITS}
    other_seed = {r.tobytes() for r in listops.dataset("train", 100, seed=1, **SMALL)[0]}
    assert all(len(r) == 100 for r in rows.values())
    assert not (rows["train"] & rows["validation"]) and not (rows["train"] & rows["test"])
    assert not (rows["validation"] & rows["test"]) and not (rows["train"] & other_seed)


def test_class_distribution_and_majority_rate():
    assert listops.majority_rate([1, 1, 2]) == pytest.approx(2 / 3)
    distribution = listops.class_distribution([0, 9, 9, 3])
    assert distribution.shape == (listops.N_CLASSES,) and distribution[9] == 0.5 and distribution.sum() == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="train", min_length=300, max_length=200), r"^min_length=300 is more than max_length=200"),
    (dict(split="train", min_length=1, max_length=4), r"^max_length=4 is too short .* use 5 or more"),
    (dict(split="dev", min_length=64, max_length=256), r"^split='dev' is unknown; expected one of train, valid"),
    (dict(split="train", min_length=10, max_length=20, max_depth=2, max_args=3),
     r"^min_length=10 is longer than any expression of max_depth=2, max_args=3 \(6 tokens\)"),
    (dict(split="train", min_length=64, max_length=256, max_depth=1), r"^max_depth=1 leaves no room"),
    (dict(split="train", min_length=64, max_length=256, max_args=1), r"^max_args=1 is too few"),
    # with max_args=2 every expression has 3 k + 1 tokens (+ CLS): 9 is no such length
    (dict(split="train", min_length=9, max_length=9, max_args=2), r"^min_length=9 with max_length=9, max_args=2: no"),
])
def test_bad_arguments_name_the_argument_and_what_would_work(kwargs, match):
    split = kwargs.pop("split")
    with pytest.raises(SettingError, match=match) as error:
        listops.dataset(split, 4, seed=0, **kwargs)
    assert "\n" not in str(error.value)


def test_batches_are_a_pure_function_of_seed_and_step_and_visit_each_example_once_an_epoch():
    task = listops.ListOps(min_length=16, max_length=48, n_train=48, n_validation=20, n_test=20)
    batch = task.batch("train", seed=1, step=3, batch_size=8)
    assert set(batch) == {"inputs", "attention_mask", "labels"}
    assert batch["inputs"].shape == (8, 48) and batch["inputs"].dtype == np.int32
    assert batch["attention_mask"].dtype == bool and batch["labels"].shape == (8,) and batch["labels"].dtype == np.int32
    again = task.batch("train", seed=1, step=3, batch_size=8)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    assert not np.array_equal(batch["inputs"], task.batch("train", seed=1, step=4, batch_size=8)["inputs"])
    assert not np.array_equal(batch["inputs"], task.batch("train", seed=2, step=3, batch_size=8)["inputs"])
    tokens, _, labels = task.examples("train")
    epoch = np.concatenate([task.batch("train", seed=1, step=s, batch_size=8)["inputs"] for s in range(6)])
    assert sorted(r.tobytes() for r in epoch) == sorted(r.tobytes() for r in tokens)  # 6 x 8 = all 48 once
    for row, label in zip(batch["inputs"], batch["labels"]):
        assert listops.evaluate(row) == label
    wide = task.batch("train", seed=1, step=3, batch_size=8, seq_len=64)  # wider than max_length: more padding
    assert wide["inputs"].shape == (8, 64) and np.array_equal(wide["inputs"][:, :48], batch["inputs"])
    assert not wide["attention_mask"][:, 48:].any()
    with pytest.raises(SettingError, match=r"^seq_len=32 is shorter than ListOps.max_length=48"):
        task.batch("train", seed=1, step=0, batch_size=8, seq_len=32)


def test_eval_batches_cover_a_split_once():
    task = listops.ListOps(min_length=16, max_length=48, n_train=8, n_validation=20, n_test=20)
    batches = list(task.eval_batches("validation", batch_size=8))
    assert len(batches) == 3 and all(b["inputs"].shape == (8, 48) for b in batches)
    assert [b["weights"].sum() for b in batches] == [8, 8, 4]
    tokens, _, labels = task.examples("validation")
    real = np.concatenate([b["labels"][b["weights"] > 0] for b in batches])
    assert np.array_equal(real, labels)
    with pytest.raises(SettingError, match=r"^ListOps.n_test=0 leaves the split empty"):
        listops.ListOps(min_length=16, max_length=48, n_test=0)
