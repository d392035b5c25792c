"""TPU slices without TPUs: the devices of any slice from libtpu's topology description, and each chip's HBM.

    devices = topology_devices("v5e:4x4")          # 16 abstract chips; jit(...).lower(...).compile() for them
                                                    # runs the real TPU compiler on this (CPU-only) machine

Needs libtpu (`pip install "libtpu==0.0.42.*"`, the version jax 0.10.2's `tpu` extra pins); the compiled
program's `memory_analysis()` is then the chip's own accounting. A topology's devices have no memory_stats(), so
each generation's HBM per chip comes from HBM_PER_CHIP below, and what the compiler lets a program use of it
from the compiler itself (`usable_hbm_bytes`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import dataclasses
import functools
from typing import Dict, List, Optional, Tuple

GIB = 2**30
LIBTPU_PIP = 'pip install "libtpu==0.0.42.*"'

# Nominal HBM per chip (bytes) by the generation prefix of a topology name, with the page that states it (its "GB"
# taken as GiB). Fitting is judged against what the compiler itself allows (`usable_hbm_bytes`): 15.75 GiB on v5e,
# 30.75 on v4, 31.25 on v6e, and 95.74 on v5p (above the page's rounded 95).
HBM_PER_CHIP: Dict[str, Tuple[int, str]] = {
    "v4": (32 * GIB, "https://cloud.google.com/tpu/docs/v4 (32 GiB HBM2 per chip)"),
    "v5e": (16 * GIB, "https://cloud.google.com/tpu/docs/v5e (HBM capacity per chip: 16 GB)"),
    "v5p": (95 * GIB, "https://cloud.google.com/tpu/docs/v5p (HBM capacity per chip: 95 GB)"),
    "v6e": (32 * GIB, "https://cloud.google.com/tpu/docs/v6e (HBM capacity per chip: 32 GB)"),
}
EXAMPLES = ("v5e:1x1", "v5e:2x2", "v5e:4x4", "v5e:16x16", "v4:2x2x1", "v4:4x4x4", "v5p:2x2x1", "v5p:8x8x8",
            "v6e:1x1", "v6e:16x16")
_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


class TopologyError(ValueError):
    """A --topology that cannot be compiled for: libtpu missing, or an unknown name. One line, what would work."""


def libtpu_available() -> bool:
    """libtpu is importable (pip's wheel) or named by TPU_LIBRARY_PATH."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    return bool(path and os.path.exists(path)) or importlib.util.find_spec("libtpu") is not None


def parse_topology(name: str, flag: str = "topology") -> Tuple[str, Tuple[int, ...]]:
    """'v5e:4x4' -> ('v5e', (4, 4)); TopologyError naming valid examples otherwise."""
    match = _NAME.match(name.strip()) if isinstance(name, str) else None
    if not match:
        raise TopologyError(f"{flag}={name} is not a TPU topology name; expected GENERATION:AxB or AxBxC with "
                            f"GENERATION one of {', '.join(HBM_PER_CHIP)}, e.g. {', '.join(EXAMPLES)}.")
    return match.group(1), tuple(int(d) for d in match.group(2).split("x"))


def chips(name: str) -> int:
    return math.prod(parse_topology(name)[1])


def hbm_bytes(name: str) -> int:
    """HBM per chip of the topology's generation (HBM_PER_CHIP)."""
    return HBM_PER_CHIP[parse_topology(name)[0]][0]


# Chips with two TensorCores (v4, v5p) are compiled for as one device each ("megacore"), as they run in a pod.
_MEGACORE = ("v4", "v5p")
# The TPU compiler's out-of-memory refusals (RESOURCE_EXHAUSTED), in its two wordings:
#   "... required for HLO temporaries (23.78G) exceeds available HBM (15.75G)."
#   "... Ran out of memory in memory space hbm. Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 6.01M."
_SIZE = r"([\d.]+)([KMGT]?)"
_REQUIRED = re.compile(rf"required for ([A-Za-z ]+?) \({_SIZE}\) exceeds available HBM \({_SIZE}\)")
_EXCEEDED = re.compile(rf"Used {_SIZE} of {_SIZE} hbm\. Exceeded hbm capacity by {_SIZE}")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


@dataclasses.dataclass(frozen=True)
class HbmRefusal:
    """The TPU compiler refused a program that does not fit one chip: what it needs and what the chip offers."""
    what: str  # e.g. "HLO temporaries" (the compiler's words)
    required_bytes: int
    available_bytes: int  # the compiler's usable HBM per chip (a little under HBM_PER_CHIP: the runtime keeps some)


def hbm_refusal(error: BaseException) -> Optional[HbmRefusal]:
    """The out-of-memory figures in a TPU compile error (RESOURCE_EXHAUSTED), or None for any other error."""
    text = str(error)
    match = _REQUIRED.search(text)
    if match:
        what, need, need_unit, have, have_unit = match.groups()
        return HbmRefusal(what.strip(), _bytes(need, need_unit), _bytes(have, have_unit))
    match = _EXCEEDED.search(text)
    if match:
        _, _, have, have_unit, over, over_unit = match.groups()
        return HbmRefusal("the program", _bytes(have, have_unit) + _bytes(over, over_unit), _bytes(have, have_unit))
    return None


@functools.lru_cache(maxsize=None)
def usable_hbm_bytes(name: str) -> int:
    """HBM per chip the TPU compiler lets a program use (a little under HBM_PER_CHIP: the runtime keeps some),
    read from libtpu itself: a program that needs twice the chip's HBM is compiled for one chip of the slice's
    generation, and the compiler's refusal states what it has ("exceeds available HBM (15.75G)" on v5e)."""
    import jax
    import jax.numpy as jnp

    generation, dims = parse_topology(name)
    device = topology_devices(f"{generation}:{'x'.join('1' for _ in dims)}")[0]
    one = jax.sharding.SingleDeviceSharding(device)
    rows = 2 * hbm_bytes(name) // (4 * 4096)

    def needs_twice_the_hbm(x):
        cumulative = jnp.cumsum(jnp.broadcast_to(x, (rows, 4096)), axis=0)  # every row kept: each feeds the next
        return cumulative[::7].sum() + cumulative[::5].sum()

    try:
        jax.jit(needs_twice_the_hbm, in_shardings=one, out_shardings=one).lower(
            jax.ShapeDtypeStruct((4096,), jnp.float32, sharding=one)).compile()
    except Exception as error:  # the refusal is the measurement
        refusal = hbm_refusal(error)
        if refusal is not None:
            return refusal.available_bytes
        raise
    raise AssertionError(f"libtpu compiled a program of {2 * hbm_bytes(name)} bytes for one {generation} chip")


def topology_devices(name: str, flag: str = "topology") -> List:
    """The abstract devices of the slice `name` (jax.experimental.topologies): one per chip (two-core v4 and v5p
    chips in megacore mode, as pods run them)."""
    generation, dims = parse_topology(name, flag)
    if not libtpu_available():
        raise TopologyError(f"{flag}={name} needs libtpu to compile for TPUs on this machine: {LIBTPU_PIP} (or "
                            "pip install -r requirements-tpu.txt).")
    # Compiling only: no TPU VM's worker list to read, and no chips to lock (several processes may compile at once).
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {}
    if math.prod(dims) < 4:  # smaller than a host's chips: the host is the slice
        kwargs["chips_per_host_bounds"] = tuple(dims) + (1,) * (3 - len(dims))
    if generation in _MEGACORE:
        kwargs["chip_config_name"] = "megacore"
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices)
    except Exception as error:  # libtpu's own message says which part it refused
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise TopologyError(f"{flag}={name} is not a slice libtpu knows ({reason}); valid examples: "
                            f"{', '.join(EXAMPLES)}.") from None
