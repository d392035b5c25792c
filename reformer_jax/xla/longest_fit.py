"""The longest sequence a training step fits in, each probe a real compile: powers of two, then to the chunk length.

    result = longest_fitting_length(probe, start=4096, step=64, capacity=16 * 2**30, max_length=2**24)
    result.power_of_two   # longest 2^k that compiled and fits
    result.longest        # longest multiple of `step` that fits; result.longest + step was probed and does not

A probe compiles the step at one length and says whether it fits, with the compiled peak (or, for a refusal, the
bytes the compiler said it needed). Compiles cost seconds to minutes, so the search guesses where the peak
crosses the capacity from the probes it has (a straight line through two of them: memory is close to affine
in length for the linear-memory variants) and probes there (the Illinois variant of regula falsi, so a curved peak converges
from both sides), with a bisection after three guesses in a row that fail to halve the bracket: it stays within a
few times a plain bisection's probes and usually takes 2-5 per phase. The
answer is only ever a probed pair: a length that fit and the next one up that did not. `python -m benchmarks.memory
--experiment=tpu --tpu_parts=longest` runs it with TPU compiles (`reformer_jax.memory.compile_train_step`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional


@dataclasses.dataclass(frozen=True)
class Probe:
    """One compile at `length`: fits or not, its peak bytes per device (a refusal: what the compiler said it needed,
    None where it did not say), and the capacity the compiler reported (None: not reported)."""
    length: int
    fits: bool
    peak_bytes: Optional[int] = None
    capacity_bytes: Optional[int] = None


@dataclasses.dataclass
class LongestFit:
    """The search's answer and every probe it compiled, in order."""
    power_of_two: Optional[int]  # longest 2^k >= step that fits (None: not even `step` fits)
    power_of_two_refused: Optional[int]  # 2 * power_of_two: probed, does not fit (None: max_length reached)
    longest: Optional[int]  # longest multiple of `step` that fits
    first_refused: Optional[int]  # longest + step: probed, does not fit (None: max_length reached)
    probes: List[Probe]

    def peak_at(self, length: Optional[int]) -> Optional[int]:
        return next((p.peak_bytes for p in self.probes if p.length == length), None)


class _Search:
    """The probes so far, memoised by length, and the guesses drawn from them."""

    def __init__(self, probe: Callable[[int], Probe], capacity: int):
        self._probe = probe
        self.capacity = capacity
        self.seen: Dict[int, Probe] = {}  # in probing order

    def fits(self, length: int) -> bool:
        if length not in self.seen:
            result = self._probe(length)
            self.seen[length] = result
            if result.capacity_bytes:  # the compiler's own figure beats the nominal one
                self.capacity = result.capacity_bytes
        return self.seen[length].fits

    def crossing(self, lo: int, hi: Optional[int], weights=(1.0, 1.0)) -> Optional[float]:
        """The length where a line through two probes reaches the capacity: the fitting probe `lo` and the refused
        `hi` where it said what it needed (each one's distance from the capacity scaled by its weight: the
        Illinois rule, so a curved peak does not pin the guesses to one end), else the two longest fitting probes
        (extrapolation). None: no line."""
        below = self.seen[lo]
        above = self.seen.get(hi) if hi is not None else None
        if above is not None and above.peak_bytes is not None and below.peak_bytes:
            short = (self.capacity - below.peak_bytes) * weights[0]  # > 0: lo fits
            over = (above.peak_bytes - self.capacity) * weights[1]
            if short <= 0 or over <= 0:
                return None
            return below.length + (above.length - below.length) * short / (short + over)
        fitting = sorted(p.length for p in self.seen.values() if p.fits and p.peak_bytes and p.length < lo)
        if not fitting or not below.peak_bytes:
            return None
        first = self.seen[fitting[-1]]
        if below.peak_bytes <= first.peak_bytes:
            return None
        slope = (below.peak_bytes - first.peak_bytes) / (below.length - first.length)
        return below.length + (self.capacity - below.peak_bytes) / slope


def _bracket(search: _Search, lo: int, hi: Optional[int], *, to_length: Callable[[int], int],
             to_index: Callable[[float], int], top: int) -> tuple:
    """Shrink grid indices (lo fits, hi refused or None: unknown) until hi = lo + 1; returns (lo, hi or None)."""
    last_width, misses = None, 0  # misses: guesses in a row that did not halve the bracket
    weights, last_moved = [1.0, 1.0], None
    while hi is None or hi - lo > 1:
        if hi is None and lo >= top:
            return lo, None
        ceiling = top if hi is None else hi - 1
        guess = search.crossing(to_length(lo), None if hi is None else to_length(hi), tuple(weights))
        width = None if hi is None else hi - lo
        if last_width is not None and width is not None:
            misses = misses + 1 if width > last_width / 2 else 0
        if guess is not None and misses < 3:
            candidate = to_index(guess)
        elif hi is None:
            candidate = lo + 1
        else:
            candidate, misses = (lo + hi) // 2, 0
        candidate = min(max(candidate, lo + 1), ceiling)
        last_width = width
        moved = 0 if search.fits(to_length(candidate)) else 1
        if moved == 0:
            lo = candidate
        else:
            hi = candidate
        # Illinois: the end that stayed put twice in a row counts half as far from the capacity, each time again.
        weights[moved] = 1.0
        if last_moved == moved:
            weights[1 - moved] /= 2
        last_moved = moved
    return lo, hi


def longest_fitting_length(probe: Callable[[int], Probe], *, start: int, step: int, capacity: int,
                           max_length: int) -> LongestFit:
    """Longest power of two in [step, max_length] that fits, then the longest multiple of `step` below twice it.

    Args:
      probe: compiles at one length (a multiple of `step`) and reports a Probe. Assumed monotone: a longer
        sequence never needs less memory; where it is not, the answer is still a probed fit/refused pair.
      start: the first power of two to probe (e.g. the setup's own length).
      step: the granularity of the second phase (the chunk length): every length probed is a multiple of it.
      capacity: bytes per device the guesses aim at (replaced by the compiler's own figure once it reports one).
      max_length: the longest length ever probed (a power of two).
    """
    for name, value in (("start", start), ("step", step), ("max_length", max_length)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value} is not a power of two.")
    if not step <= start <= max_length:
        raise ValueError(f"expected step <= start <= max_length, got {step}, {start}, {max_length}.")
    search = _Search(probe, capacity)
    low_exp, top_exp = int(math.log2(step)), int(math.log2(max_length))
    exp = int(math.log2(start))
    while not search.fits(2**exp):  # the start itself does not fit: halve until something does
        if exp == low_exp:
            return LongestFit(None, None, None, step, list(search.seen.values()))
        exp -= 1
    refused_exp = next((e for e in range(exp + 1, top_exp + 1) if 2**e in search.seen), None)
    lo_exp, hi_exp = _bracket(search, exp, refused_exp, to_length=lambda e: 2**e,
                              to_index=lambda length: int(math.floor(math.log2(max(length, 1)))), top=top_exp)
    power = 2**lo_exp
    if hi_exp is None:
        return LongestFit(power, None, power, None, list(search.seen.values()))
    # Second phase: multiples of step in [power, 2 * power].
    lo, hi = _bracket(search, power // step, 2 * power // step, to_length=lambda i: i * step,
                      to_index=lambda length: int(length // step), top=2 * power // step)
    return LongestFit(power, 2**hi_exp, lo * step, hi * step, list(search.seen.values()))
