"""Which devices a run uses and how they are laid out, when the user has not said.

On a CPU with two or more cores, one process, and a model whose heads and feed-forward width split in two, the
host is split into two devices and the run uses the mesh tensor:2 (a layer's heads on separate cores: the fastest
CPU setting measured, docs/speed.md). Everywhere else, every device goes on data (data parallel). A device count the
user set through JAX's own settings (XLA_FLAGS' host platform device count, JAX_NUM_CPU_DEVICES) always wins.

The host can be split only before jax starts its backends: `split_host` says whether it could.
"""

from __future__ import annotations

import os
from typing import Optional

from reformer_jax.model.config import ModelConfig

CPU_DEFAULT_MESH, CPU_DEFAULT_DEVICES = "tensor:2", 2
DEFAULT_MESH = "data:-1"
_HOST_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def users_device_count() -> Optional[str]:
    """The CPU device count the user set through JAX's own settings, as they wrote it; None where they set none."""
    for part in os.environ.get("XLA_FLAGS", "").split():
        if part.startswith(_HOST_DEVICE_COUNT):
            return f"XLA_FLAGS {part}"
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return f"JAX_NUM_CPU_DEVICES={os.environ['JAX_NUM_CPU_DEVICES']}"
    return None


def cpu_default_applies(config: ModelConfig, *, mesh_given: bool, host_devices_given: bool,
                        multi_process: bool) -> bool:
    """No mesh, no host device count and no device count of the user's own, one process, 2+ cores, and heads /
    d_ff that split in two: the host is to be split into two devices. Whether they are used (CPU) or not (GPU,
    TPU) is known once jax has started (`default_mesh`)."""
    return (not mesh_given and not host_devices_given and users_device_count() is None and not multi_process
            and (os.cpu_count() or 1) >= CPU_DEFAULT_DEVICES
            and config.n_heads % CPU_DEFAULT_DEVICES == 0 and config.d_ff % CPU_DEFAULT_DEVICES == 0)


def split_host(count: int) -> bool:
    """Start the CPU backend with `count` devices; False where jax has already started (it cannot any more)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)  # refused once the backends exist
    except RuntimeError:
        return False
    os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                        if not f.startswith(_HOST_DEVICE_COUNT)] + [f"{_HOST_DEVICE_COUNT}={count}"])
    return True


def default_mesh(host_was_split: bool) -> str:
    """The mesh of a run that names none: tensor:2 on a CPU whose host was split for it, else every device on
    data."""
    import jax

    return CPU_DEFAULT_MESH if host_was_split and jax.default_backend() == "cpu" else DEFAULT_MESH
