"""The longest-fit search (reformer_jax/xla/longest_fit.py) against brute force on synthetic memory curves."""

import math

import pytest

from reformer_jax.xla.longest_fit import Probe, longest_fitting_length

GIB = 2**30
STEP = 64


def curve_probe(peak, capacity, *, says_needed=True, reports_capacity=False):
    """A probe for the memory curve peak(length): fits at or under capacity; a refusal says what it needed."""
    calls = []

    def probe(length):
        assert length % STEP == 0
        calls.append(length)
        need = int(peak(length))
        fits = need <= capacity
        return Probe(length, fits, need if fits or says_needed else None,
                     capacity if reports_capacity else None)

    return probe, calls


def brute_force(peak, capacity, max_length):
    lengths = range(STEP, max_length + 1, STEP)
    fitting = [l for l in lengths if peak(l) <= capacity]
    powers = [l for l in fitting if l & (l - 1) == 0]
    return (powers[-1] if powers else None), (max(fitting) if fitting else None)


CURVES = {
    "affine (Reformer-like)": lambda l: 300e6 + 23_500 * l,
    "quadratic (full attention)": lambda l: 200e6 + 520 * l * l,
    "affine with a padding staircase": lambda l: 1e8 + 40_000 * (4096 * math.ceil(l / 4096)),
    "super-linear power law": lambda l: 5e5 * l ** 1.3,
}


@pytest.mark.parametrize("name", sorted(CURVES))
@pytest.mark.parametrize("says_needed", [True, False])
def test_search_finds_the_brute_force_answer(name, says_needed):
    peak, capacity, max_length = CURVES[name], 16 * GIB, 2**24
    probe, calls = curve_probe(peak, capacity, says_needed=says_needed)
    result = longest_fitting_length(probe, start=4096, step=STEP, capacity=capacity, max_length=max_length)
    want_power, want_longest = brute_force(peak, capacity, max_length)
    assert (result.power_of_two, result.longest) == (want_power, want_longest)
    # The answer is a probed pair: the longest length fit, the next multiple of the step was refused.
    seen = {p.length: p.fits for p in result.probes}
    assert seen[result.longest] and seen[result.first_refused] is False
    assert result.first_refused == result.longest + STEP
    assert seen[result.power_of_two] and seen[result.power_of_two_refused] is False
    # Never more than about twice a plain bisection's probes (powers: 13 exponents; chunks: up to 2^18 grid points).
    assert len(calls) == len(set(calls)) <= 2 * (math.log2(max_length // STEP) + math.log2(2**24 // STEP)) + 4


def test_affine_memory_takes_few_probes():
    probe, calls = curve_probe(CURVES["affine (Reformer-like)"], 16 * GIB)
    longest_fitting_length(probe, start=4096, step=STEP, capacity=16 * GIB, max_length=2**24)
    assert len(calls) <= 8, calls  # bisection alone would take 4 doublings + 13 halvings


def test_compiler_capacity_replaces_the_nominal_one():
    """Guesses aim at the capacity the compiler reports (a little under the nominal HBM), and the answer is the
    compiler's verdict either way."""
    peak, real = CURVES["affine (Reformer-like)"], int(15.75 * GIB)
    probe, _ = curve_probe(peak, real, reports_capacity=True)
    result = longest_fitting_length(probe, start=4096, step=STEP, capacity=16 * GIB, max_length=2**24)
    assert result.longest == brute_force(peak, real, 2**24)[1]


def test_start_that_does_not_fit_halves_down():
    peak = CURVES["quadratic (full attention)"]
    probe, _ = curve_probe(peak, 1 * GIB)
    result = longest_fitting_length(probe, start=4096, step=STEP, capacity=1 * GIB, max_length=2**20)
    assert (result.power_of_two, result.longest) == brute_force(peak, 1 * GIB, 2**20)
    assert result.power_of_two < 4096


def test_nothing_fits_and_everything_fits():
    probe, _ = curve_probe(lambda l: 10 * GIB, GIB)
    result = longest_fitting_length(probe, start=256, step=STEP, capacity=GIB, max_length=4096)
    assert result.longest is None and result.power_of_two is None and result.first_refused == STEP
    probe, _ = curve_probe(lambda l: l, GIB)
    result = longest_fitting_length(probe, start=256, step=STEP, capacity=GIB, max_length=4096)
    assert result.longest == result.power_of_two == 4096 and result.first_refused is None


@pytest.mark.parametrize("bad", [dict(start=3000), dict(step=48), dict(max_length=2**20 + 1),
                                 dict(start=32), dict(max_length=2048)])
def test_bad_arguments_refused(bad):
    kwargs = {**dict(start=4096, step=STEP, capacity=GIB, max_length=2**20), **bad}
    with pytest.raises(ValueError):
        longest_fitting_length(lambda l: Probe(l, True, l), **kwargs)
