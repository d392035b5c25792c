"""ListOps (Nangia & Bowman 2018, as Long Range Arena uses it): classify the value, 0-9, of a nested list expression.

    [MAX 2 9 [MIN 4 7 ] 0 ]  ->  9

Operators take 2 to `max_args` arguments, each a digit 0-9 or another expression:
- MAX, MIN: the largest, the smallest argument;
- MED: the median; of an even count, the floor of the mean of the two middle values (MED 2 5 = 3), which is what
  the original generators compute (the integer part of numpy's median), not the lower or upper middle value;
- SM: the sum modulo 10.

Tokens (`VOCAB_SIZE` = 17): pad 0, cls 1, "[MAX" 2, "[MIN" 3, "[MED" 4, "[SM" 5, "]" 6, digits "0".."9" 7..16. Every
encoded sequence starts with CLS_ID: a classification head that pools the first position (as Hugging Face's
ReformerForSequenceClassification does) reads it.

Lengths count every token of the encoded sequence, CLS included (Long Range Arena's count leaves CLS out). Depth
is counted as Long Range Arena counts it: the root operator is at depth 1, digits may sit at depth `max_depth`,
operators only above it (at most max_depth - 1 nested operators).

The generator is this project's own: it grows a tree from a root operator to a length drawn uniformly from
[min_length, max_length] (turning a random digit into an operator with random digits, or adding a digit to an
operator with room), instead of Long Range Arena's rejection of trees grown with no length in mind, so any length
range costs the same to fill. Defaults are Long Range Arena's: max depth 10, max arguments 10, lengths 500-2000,
96,000 / 2,000 / 2,000 examples. Small lengths (64-256) make quick CPU runs.

Examples are a pure function of (seed, split, index): the splits draw from different seed streams, the first m
examples of a split do not depend on how many are asked for, and the same arguments give the same bytes. (Long
Range Arena also drops repeated expressions; at 20 tokens and more, two draws are practically never the same.)

The labels are not balanced: MAX makes many 9s and MIN many 0s, so the majority class holds about 18% of the
examples (`majority_rate`: 0.179 of 20,000 examples of 500-2000 tokens, 0.164 at 64-256), the floor a model must
beat. Generating those 20,000 examples of 500-2000 tokens takes 16 s of CPU time on one core (AMD EPYC, Python
3.11.7, numpy 2.4.6; `listops.dataset('train', 20000, seed=0, min_length=500, max_length=2000)` timed with
`time.process_time`).
Shapes: b batch, l sequence length, n examples.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from reformer_jax.errors import SettingError

PAD_ID, CLS_ID = 0, 1
OPERATORS = ("MAX", "MIN", "MED", "SM")
MAX_ID, MIN_ID, MED_ID, SM_ID = 2, 3, 4, 5
CLOSE_ID = 6
DIGIT_OFFSET = 7  # digit d is id d + 7
TOKENS = ("<pad>", "<cls>") + tuple("[" + op for op in OPERATORS) + ("]",) + tuple("0123456789")
VOCAB_SIZE = len(TOKENS)
N_CLASSES = 10
SPLITS = ("train", "validation", "test")
_STREAM = {"train": 0, "validation": 1, "test": 2}  # each split's seed stream
_BATCH_STREAM = 10  # the order batches visit examples: another stream than the examples'

DEFAULT_MAX_DEPTH, DEFAULT_MAX_ARGS = 10, 10
DEFAULT_MIN_LENGTH, DEFAULT_MAX_LENGTH = 500, 2000
DEFAULT_SIZES = {"train": 96_000, "validation": 2_000, "test": 2_000}
SHORTEST = 5  # <cls> [MAX 1 2 ]: CLS, an operator, two digits, its close

Tree = Union[int, Tuple[str, List["Tree"]]]  # a digit, or (operator name, its arguments)
Batch = Dict[str, np.ndarray]

_ID_OF = {token: i for i, token in enumerate(TOKENS)}
_OP_NAME = {MAX_ID: "MAX", MIN_ID: "MIN", MED_ID: "MED", SM_ID: "SM"}
_OP_ID = {name: i for i, name in _OP_NAME.items()}


def _median(values: Sequence[int]) -> int:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2


def _sum_mod(values: Sequence[int]) -> int:
    return sum(values) % 10


_APPLY = {MAX_ID: max, MIN_ID: min, MED_ID: _median, SM_ID: _sum_mod}
_OP_IDS = (MAX_ID, MIN_ID, MED_ID, SM_ID)


# --- tokens, trees and their value ---------------------------------------------------------------------------------

def encode(expression: str) -> np.ndarray:
    """"[MAX 2 9 ]" (tokens separated by spaces) -> int32 ids [1 + tokens], CLS first."""
    try:
        return np.array([CLS_ID] + [_ID_OF[token] for token in expression.split()], np.int32)
    except KeyError as error:
        raise ValueError(f"expression token {error.args[0]!r} is not a ListOps token; expected one of "
                         f"{' '.join(TOKENS[2:])}.") from None


def decode(ids) -> str:
    """int ids [l] -> the expression as text, without CLS and padding."""
    return " ".join(TOKENS[i] for i in np.asarray(ids).reshape(-1).tolist() if i not in (PAD_ID, CLS_ID))


def _as_ids(expression) -> List[int]:
    if isinstance(expression, str):
        return encode(expression).tolist()
    ids = np.asarray(expression)
    if ids.dtype.kind in "US":  # a list of token strings
        return encode(" ".join(ids.reshape(-1).tolist())).tolist()
    if ids.dtype.kind not in "iu":
        raise ValueError(f"expression of dtype {ids.dtype} is not ListOps text, tokens or ids.")
    return ids.reshape(-1).tolist()


def parse(expression) -> Tree:
    """Text, token strings or ids [l] (CLS and padding skipped) -> the tree: a digit, or (operator, [arguments])."""
    if isinstance(expression, (int, np.integer)) and not isinstance(expression, bool):
        return int(expression)
    open_ops: List[Tuple[str, List[Tree]]] = [("", [])]  # the bottom entry collects the whole expression
    for i in _as_ids(expression):
        if i in _OP_NAME:
            open_ops.append((_OP_NAME[i], []))
        elif i == CLOSE_ID:
            if len(open_ops) == 1:
                raise ValueError("expression closes a bracket it never opened; every ']' needs an operator before it.")
            node = open_ops.pop()
            if not node[1]:
                raise ValueError(f"expression has [{node[0]} with no arguments; an operator needs at least one.")
            open_ops[-1][1].append(node)
        elif DIGIT_OFFSET <= i < VOCAB_SIZE:
            open_ops[-1][1].append(i - DIGIT_OFFSET)
        elif i not in (PAD_ID, CLS_ID):
            raise ValueError(f"expression holds id {i}, not a ListOps id; expected ids in [0, {VOCAB_SIZE}).")
    if len(open_ops) > 1:
        raise ValueError(f"expression leaves {len(open_ops) - 1} bracket(s) open; close each operator with ']'.")
    if len(open_ops[0][1]) != 1:
        raise ValueError(f"expression holds {len(open_ops[0][1])} top-level terms; expected exactly one.")
    return open_ops[0][1][0]


def _is_tree(expression) -> bool:
    return (isinstance(expression, tuple) and len(expression) == 2 and isinstance(expression[0], str)
            and isinstance(expression[1], list))


def _value(tree: Tree) -> int:
    if _is_tree(tree):
        name, arguments = tree
        if name not in _OP_ID:
            raise ValueError(f"tree operator {name!r} is unknown; expected one of {', '.join(OPERATORS)}.")
        if not arguments:
            raise ValueError(f"tree operator {name} has no arguments; an operator needs at least one.")
        return _APPLY[_OP_ID[name]]([_value(a) for a in arguments])
    if isinstance(tree, bool) or not isinstance(tree, (int, np.integer)) or not 0 <= tree <= 9:
        raise ValueError(f"tree term {tree!r} is neither a digit 0-9 nor an (operator, [arguments]) pair.")
    return int(tree)


def evaluate(expression) -> int:
    """The value 0-9 of a tree (a digit, or (operator name, [arguments]) as `parse` returns), or of an expression
    as text, token strings or ids [l]."""
    return _value(expression if _is_tree(expression) else parse(expression))


# --- arguments -----------------------------------------------------------------------------------------------------

def capacity(max_depth: int, max_args: int) -> int:
    """The length of the longest encoded expression (CLS included) within max_depth and max_args, a full tree
    (or a number above 2 ** 40 where that is longer)."""
    longest = 1  # a digit at depth max_depth
    for _ in range(max_depth - 1):
        longest = 2 + max_args * longest
        if longest > 2 ** 40:  # longer than any sequence anyone will ask for: stop counting
            break
    return 1 + longest


def _check(split: Optional[str], min_length: int, max_length: int, max_depth: int, max_args: int,
           owner: str = "") -> None:
    def fail(field, value, text):
        raise SettingError(owner, field, value, text)

    if split is not None and split not in SPLITS:
        fail("split", split, f"is unknown; expected one of {', '.join(SPLITS)}.")
    if max_depth < 2:
        fail("max_depth", max_depth, "leaves no room for an operator (the root is at depth 1, its digits at 2); "
             "use 2 or more (Long Range Arena: 10).")
    if max_args < 2:
        fail("max_args", max_args, "is too few: an operator takes at least 2 arguments; use 2 or more "
             "(Long Range Arena: 10).")
    if max_length < SHORTEST:
        fail("max_length", max_length, f"is too short for any expression: the shortest, <cls> [MAX 1 2 ], has "
             f"{SHORTEST} tokens; use {SHORTEST} or more.")
    if min_length > max_length:
        fail("min_length", min_length, f"is more than max_length={max_length}; use a min_length <= max_length.")
    longest = capacity(max_depth, max_args)
    if min_length > longest:
        fail("min_length", min_length, f"is longer than any expression of max_depth={max_depth}, "
             f"max_args={max_args} ({longest} tokens); use a smaller min_length or a larger max_depth or max_args.")


# --- the generator -------------------------------------------------------------------------------------------------

def _grow(rand, digit_rng: np.random.Generator, length: int, max_depth: int,
          max_args: int) -> Optional[Tuple[np.ndarray, int]]:
    """(int32 ids [length] CLS first, the value) of a random expression of exactly `length` tokens, or None where
    the tree grew into a shape that cannot reach it (every operator full, 1 or 2 tokens short): the caller redraws.

    An operator is stored as its token, its count of digit arguments and its operator arguments; the operators
    are symmetric, so where the operator arguments stand among the digits is drawn only when the text is written.
    The loops run once per operator, never per digit: digits are drawn, written and read in slices."""
    target = length - 1  # the expression's tokens
    k = 2 + int(rand() * (min(max_args, target - 2) - 1))
    ops, n_digits, subs, depth = [_OP_IDS[int(rand() * 4)]], [k], [[]], [1]  # per operator
    expandable = [0] * k if 2 < max_depth else []  # per digit that may become an operator: its operator
    roomy = [0] if k < max_args else []  # the operators with fewer than max_args arguments
    n = 2 + k
    while n < target:
        gap = target - n
        if gap >= 3 and expandable:  # a digit becomes an operator over k new digits: k + 1 more tokens
            j = int(rand() * len(expandable))
            parent = expandable[j]
            expandable[j] = expandable[-1]
            expandable.pop()
            op, k, d = len(ops), 2 + int(rand() * (min(max_args, gap - 1) - 1)), depth[parent] + 1
            n_digits[parent] -= 1
            subs[parent].append(op)
            ops.append(_OP_IDS[int(rand() * 4)])
            n_digits.append(k)
            subs.append([])
            depth.append(d)
            if d + 1 < max_depth:
                expandable.extend([op] * k)
            if k < max_args:
                roomy.append(op)
            n += k + 1
        elif roomy:  # one more digit for an operator with room: 1 more token
            j = int(rand() * len(roomy))
            op = roomy[j]
            n_digits[op] += 1
            if depth[op] + 1 < max_depth:
                expandable.append(op)
            if n_digits[op] + len(subs[op]) == max_args:
                roomy[j] = roomy[-1]
                roomy.pop()
            n += 1
        else:
            return None

    starts = [0]  # operator i owns digits[starts[i]:starts[i] + n_digits[i]]
    for count in n_digits:
        starts.append(starts[-1] + count)
    digit_array = digit_rng.integers(0, 10, starts[-1])
    digits, digit_ids = digit_array.tolist(), (digit_array + DIGIT_OFFSET).tolist()
    values = [0] * len(ops)
    for op in range(len(ops) - 1, -1, -1):  # an operator's operator arguments were created after it
        arguments = digits[starts[op]:starts[op] + n_digits[op]]
        arguments.extend([values[sub] for sub in subs[op]])
        values[op] = _APPLY[ops[op]](arguments)

    ids = [CLS_ID]
    append, extend = ids.append, ids.extend

    def emit(op: int) -> None:
        append(ops[op])
        start, count = starts[op], n_digits[op]
        done = 0
        if subs[op]:  # each operator argument goes before a random one of the digits (or after the last)
            for place, sub in sorted([(int(rand() * (count + 1)), sub) for sub in subs[op]]):
                extend(digit_ids[start + done:start + place])
                done = place
                emit(sub)
        extend(digit_ids[start + done:start + count])
        append(CLOSE_ID)

    emit(0)
    return np.array(ids, np.int32), values[0]


_MAX_TRIES = 1000


def _example_rngs(seed: int, split: str, index: int):
    # SeedSequence mixes (seed, split, index) into an independent stream per example. Python's Mersenne Twister
    # draws the tree's many scalars (numpy's per-call overhead is 20 times larger); numpy draws the digits in bulk.
    digit_rng = np.random.default_rng([seed, _STREAM[split], index])
    return random.Random(int(digit_rng.integers(2 ** 63))).random, digit_rng


def example(split: str, index: int, *, seed: int = 0, min_length: int = DEFAULT_MIN_LENGTH,
            max_length: int = DEFAULT_MAX_LENGTH, max_depth: int = DEFAULT_MAX_DEPTH,
            max_args: int = DEFAULT_MAX_ARGS) -> Tuple[np.ndarray, int]:
    """Example `index` of a split: (int32 ids [length], CLS first, min_length <= length <= max_length; its value)."""
    _check(split, min_length, max_length, max_depth, max_args)
    return _example(split, index, seed, min_length, max_length, max_depth, max_args)


def _example(split, index, seed, min_length, max_length, max_depth, max_args):
    rand, digit_rng = _example_rngs(seed, split, index)
    low, high = max(min_length, SHORTEST), min(max_length, capacity(max_depth, max_args))
    for _ in range(_MAX_TRIES):
        grown = _grow(rand, digit_rng, low + int(rand() * (high - low + 1)), max_depth, max_args)
        if grown is not None:
            return grown
    raise SettingError("", "min_length", min_length, f"with max_length={max_length}, max_args={max_args}: no "
                       f"expression of a length in that range was found in {_MAX_TRIES} tries; widen the range or "
                       f"raise max_args.")


@functools.lru_cache(maxsize=8)
def _split_examples(split: str, n_examples: int, seed: int, min_length: int, max_length: int, max_depth: int,
                    max_args: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 ids [n, max_length] padded with PAD_ID, int32 lengths [n], int32 labels [n]), read-only: uint8 keeps
    Long Range Arena's 96,000 training examples in 192 MB."""
    tokens = np.full((n_examples, max_length), PAD_ID, np.uint8)
    lengths = np.zeros(n_examples, np.int32)
    labels = np.zeros(n_examples, np.int32)
    for i in range(n_examples):
        ids, labels[i] = _example(split, i, seed, min_length, max_length, max_depth, max_args)
        tokens[i, :len(ids)], lengths[i] = ids, len(ids)
    for array in (tokens, lengths, labels):
        array.setflags(write=False)
    return tokens, lengths, labels


def _checked_count(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SettingError("", field, value, "is not a count; use an integer >= 0.")


def dataset(split: str, n_examples: int, *, seed: int = 0, min_length: int = DEFAULT_MIN_LENGTH,
            max_length: int = DEFAULT_MAX_LENGTH, max_depth: int = DEFAULT_MAX_DEPTH,
            max_args: int = DEFAULT_MAX_ARGS) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `n_examples` of a split: (int32 tokens [n, max_length] CLS first and padded with PAD_ID,
    bool attention_mask [n, max_length] True at real tokens, int32 labels [n] in 0-9)."""
    _check(split, min_length, max_length, max_depth, max_args)
    _checked_count("n_examples", n_examples)
    _checked_count("seed", seed)
    tokens, lengths, labels = _split_examples(split, int(n_examples), int(seed), min_length, max_length, max_depth,
                                              max_args)
    mask = np.arange(max_length)[None, :] < lengths[:, None]
    return tokens.astype(np.int32), mask, labels.copy()


def class_distribution(labels) -> np.ndarray:
    """int labels [n] -> float64 [N_CLASSES]: the fraction of each class."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("labels is empty; the class distribution needs at least one label.")
    return np.bincount(labels, minlength=N_CLASSES) / labels.size


def majority_rate(labels) -> float:
    """The accuracy of always answering the most common class of int labels [n]: the floor a model must beat."""
    return float(class_distribution(labels).max())


# --- batches -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ListOps:
    """The ListOps task: fixed train / validation / test sets drawn from `data_seed` (so runs with different
    seeds see the same examples) and batches that are a pure function of (seed, step).

    A batch is {"inputs": int32 [b, l], "attention_mask": bool [b, l], "labels": int32 [b]}, l = seq_len (at least
    max_length; the columns after max_length are padding).
    """

    min_length: int = DEFAULT_MIN_LENGTH
    max_length: int = DEFAULT_MAX_LENGTH
    max_depth: int = DEFAULT_MAX_DEPTH
    max_args: int = DEFAULT_MAX_ARGS
    n_train: int = DEFAULT_SIZES["train"]
    n_validation: int = DEFAULT_SIZES["validation"]
    n_test: int = DEFAULT_SIZES["test"]
    data_seed: int = 0

    def __post_init__(self):
        _check(None, self.min_length, self.max_length, self.max_depth, self.max_args, owner="ListOps")
        for split in SPLITS:
            if self.size(split) < 1:
                raise SettingError("ListOps", f"n_{split}", self.size(split), "leaves the split empty; use 1 or more.")

    @property
    def source(self) -> str:
        return (f"ListOps (lengths {self.min_length}-{self.max_length}, max depth {self.max_depth}, max args "
                f"{self.max_args}, data seed {self.data_seed})")

    def to_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)

    def size(self, split: str) -> int:
        return {"train": self.n_train, "validation": self.n_validation, "test": self.n_test}[split]

    def examples(self, split: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A split's examples as `dataset` returns them (generated once per process, then cached)."""
        return dataset(split, self.size(split), seed=self.data_seed, min_length=self.min_length,
                       max_length=self.max_length, max_depth=self.max_depth, max_args=self.max_args)

    def _rows(self, split: str, rows: np.ndarray, seq_len: Optional[int]) -> Batch:
        seq_len = self.max_length if seq_len is None else seq_len
        if seq_len < self.max_length:
            raise SettingError("", "seq_len", seq_len, f"is shorter than ListOps.max_length={self.max_length}; use "
                               f"seq_len >= {self.max_length} or a smaller max_length.")
        # Only the rows asked for are generated (each a pure function of its index): a run starts at once, and
        # a short one never pays for the whole split.
        inputs = np.full((len(rows), seq_len), PAD_ID, np.int32)
        lengths = np.zeros(len(rows), np.int32)
        labels = np.zeros(len(rows), np.int32)
        for i, row in enumerate(rows):
            ids, labels[i] = _example(split, int(row), self.data_seed, self.min_length, self.max_length,
                                      self.max_depth, self.max_args)
            inputs[i, :len(ids)], lengths[i] = ids, len(ids)
        return {"inputs": inputs, "attention_mask": np.arange(seq_len)[None, :] < lengths[:, None], "labels": labels}

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: Optional[int] = None) -> Batch:
        """Batch `step`: rows step * b .. (step + 1) * b of an endless sequence of epochs, each a permutation of
        the split drawn from (seed, split, epoch), so every example is seen once per epoch and batch s is the same
        whether a run went straight through or was resumed."""
        _check(split, self.min_length, self.max_length, self.max_depth, self.max_args)
        n = self.size(split)
        rows = []
        position, end = step * batch_size, (step + 1) * batch_size
        while position < end:
            epoch, offset = divmod(position, n)
            order = np.random.default_rng([seed, _BATCH_STREAM + _STREAM[split], epoch]).permutation(n)
            taken = order[offset:offset + end - position]
            rows.append(taken)
            position += len(taken)
        return self._rows(split, np.concatenate(rows), seq_len)

    def eval_batches(self, split: str, batch_size: int, seq_len: Optional[int] = None) -> Iterator[Batch]:
        """Every example of a split once, in order, `batch_size` per batch; each batch also holds "weights":
        float32 [b], 0 for the rows that fill the last batch (copies of its first example) and 1 elsewhere."""
        _check(split, self.min_length, self.max_length, self.max_depth, self.max_args)
        n = self.size(split)
        for start in range(0, n, batch_size):
            real = np.arange(start, min(start + batch_size, n))
            rows = np.concatenate([real, np.full(batch_size - len(real), start)])
            weights = (np.arange(batch_size) < len(real)).astype(np.float32)
            yield {**self._rows(split, rows, seq_len), "weights": weights}
