"""Runs main.py with test-only faults switched on by environment variables (used by test_faults.py).

    FAULT_STEP_DELAY=0.05          sleep this long before each training batch (so a kill lands mid-run)
    FAULT_KILL_DURING_SAVE=6       SIGKILL this process while checkpoint 6 is being saved: its files are written to
                                   orbax's temporary directory but not yet renamed into place

    python -m tests.fault_runner --flag=value ...   (from the repository root; the flags of main.py)
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

from reformer_jax.training import data

REPO = Path(__file__).resolve().parents[1]

delay = float(os.environ.get("FAULT_STEP_DELAY", "0"))
if delay:
    copy_task_batch = data.CopyTask.batch

    def slow_batch(self, *args, **kwargs):
        time.sleep(delay)
        return copy_task_batch(self, *args, **kwargs)

    data.CopyTask.batch = slow_batch

kill_step = os.environ.get("FAULT_KILL_DURING_SAVE")
if kill_step:
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def killed_while_finalizing(self):
        if self._final_path.name == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = killed_while_finalizing

sys.argv = [str(REPO / "main.py"), *sys.argv[1:]]
runpy.run_path(str(REPO / "main.py"), run_name="__main__")
