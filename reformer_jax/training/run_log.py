"""What a training run shows and keeps: a progress line on the terminal and metrics as JSON lines."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, TextIO


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """One progress line: step, loss, bits per character, tokens/s and ETA.

    On a terminal the line is redrawn in place; otherwise (logs, CI) a line is printed every `every` steps.
    """

    def __init__(self, total_steps: int, start_step: int, *, stream: TextIO = sys.stdout, every: Optional[int] = None):
        self.total, self.start = total_steps, start_step
        self.stream = stream
        self.interactive = stream.isatty()
        self.every = every or max(1, (total_steps - start_step) // 20)
        self.started = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_sec: float, extra: str = "") -> None:
        done = step - self.start
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done else float("nan")
        width = len(str(self.total))
        line = (f"step {step:>{width}}/{self.total} | loss {loss:.4f} | bpc {loss / math.log(2):.3f} | "
                f"{tokens_per_sec:,.0f} tok/s | ETA {format_duration(eta)}{extra}")
        if self.interactive:
            self.stream.write("\r" + line.ljust(100))
            if step == self.total:
                self.stream.write("\n")
        elif done == 1 or step % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, without breaking the progress line."""
        self.stream.write(("\n" if self.interactive else "") + text + "\n")
        self.stream.flush()


class MetricsLog:
    """workdir/metrics.jsonl: one JSON object per training step, `step` = optimizer updates done.

    On resume the lines past the restored step (written after the last checkpoint by the interrupted run) are
    dropped, atomically, so each step appears once.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def write(self, row: Dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
