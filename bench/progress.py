"""A progress bar that uses tqdm when it is installed and prints plain lines to stderr when it is not."""

from __future__ import annotations

import sys
import time

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # the GPU box may not have tqdm
    _tqdm = None


class _LineProgress:
    """Minimal stand-in for tqdm: one line per step with the count, elapsed time and the current label."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.count, self.enabled = total, desc, 0, enabled
        self.start = time.perf_counter()
        self.label = ""

    def set_postfix_str(self, label: str) -> None:
        self.label = label
        if self.enabled:
            print(f"{self.desc} [{self.count}/{self.total}, {time.perf_counter() - self.start:4.0f}s] {label}",
                  file=sys.stderr, flush=True)

    def update(self, steps: int = 1) -> None:
        self.count += steps

    def close(self) -> None:
        if self.enabled:
            print(f"{self.desc} done: {self.count}/{self.total} in {time.perf_counter() - self.start:.0f}s",
                  file=sys.stderr, flush=True)


def progress(total: int, desc: str, enabled: bool = True):
    """Returns an object with update(), set_postfix_str() and close(); tqdm's bar when available."""
    if _tqdm is not None:
        return _tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
    return _LineProgress(total, desc, enabled)
