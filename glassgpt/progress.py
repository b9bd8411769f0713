"""Progress of a long build, told twice: a tqdm bar on stderr for a terminal, and a callback for a
program (the viewer's progress bar), so that nothing reads tqdm's private state.

    with Progress(total, "span shards", unit="tok", callback=on_progress) as bar:
        bar.update(n)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

# callback(done, total, what): called at the start, after every update, and at the end
ProgressFn = Callable[[int, int, str], None]


class Progress:
    def __init__(self, total: int, desc: str, *, unit: str = "it", callback: ProgressFn | None = None,
                 disable: bool | None = None, unit_scale: bool = False):
        from tqdm import tqdm

        self.n, self.total, self.desc, self.callback = 0, int(total), desc, callback
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=disable, file=sys.stderr)
        self._report()

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.n, self.total, self.desc)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        self.bar.update(n)
        self._report()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
