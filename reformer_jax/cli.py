"""The command-line conventions of main.py and the tools (evaluate, plot): absl flags, errors as one line.

A bad flag or value prints one line on stderr naming the flag, the value and what would work, and exits 2; the
usage text appears only on --help, which exits 0.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, List

from absl import app, flags

from reformer_jax import errors


class UsageError(app.UsageError):
    """A bad flag value; its message is the one line the user sees."""


def command(argv0: str) -> str:
    """How the user started this program: "python -m reformer_jax.evaluate" or "python main.py"."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else f"python {os.path.basename(argv0)}"


def parse_flags(argv: List[str]) -> List[str]:
    """absl's flag parsing, but a bad flag is one line on stderr (exit 2) and --help exits 0."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        text = re.sub(r"invalid literal for (int|float)\(\)[^:]*: (.*)", r"\2 is not a number (\1 expected)",
                      str(error))
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        print(f"error: {'; '.join(lines)} ({command(argv[0])} --help lists the flags)", file=sys.stderr)
        sys.exit(2)
    except SystemExit as exit_:  # absl's --help, --helpshort, --helpfull print the usage, then exit 1
        sys.exit(0 if exit_.code == 1 else exit_.code)


def quiet_absent_tpu() -> None:
    """With libtpu installed (the `tpu` extra, or the test requirements) on a machine without TPU chips, jax would
    probe for them at start-up and print libtpu's failure to find them; there, unless JAX_PLATFORMS says
    otherwise, jax is told to use its other backends. A TPU VM (its /dev/accel* or /dev/vfio chips) is left alone."""
    import glob
    import importlib.util

    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    platforms = [platform for platform, plugins in (("cuda", ("jax_cuda12_plugin", "jax_cuda13_plugin")),
                                                   ("rocm", ("jax_rocm7_plugin", "jax_rocm_plugin")))
                 if any(importlib.util.find_spec(plugin) is not None for plugin in plugins)]
    os.environ["JAX_PLATFORMS"] = ",".join(platforms + ["cpu"])  # for subprocesses; jax read it when imported:
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def run(main: Callable[[List[str]], int]) -> None:
    """app.run with `parse_flags`; `main` returns the exit status, and an app.UsageError it raises is one line."""
    quiet_absent_tpu()

    def checked(argv: List[str]) -> int:
        try:
            with errors.flag_names():  # the library's messages name this command line's flags
                return main(argv)
        except app.UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    app.run(lambda argv: sys.exit(checked(argv)), flags_parser=parse_flags)
