"""User-facing errors: one line saying what is wrong and what to do, and a non-zero exit.

Raise `UserError` for mistakes a user can fix (bad config, missing data, a foreign checkpoint...);
`cli.run_main` turns it into `error: <message>` on stderr and exit status 2. Internal bugs are not
UserErrors and keep their traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input or environment, explained in one actionable line."""


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Call `main(argv)`, printing a UserError as one line and returning the exit status."""
    try:
        main(argv)
    except UserError as e:
        # one write of the whole line: ranks of a torchrun job share stderr, and a pipe keeps a single
        # write under PIPE_BUF bytes whole, where print's separate message and newline can interleave
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        _tell_torchrun(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _tell_torchrun(line: str) -> None:
    """Under torchrun, put the line into the rank's error file, so that torchrun's closing
    ChildFailedError report shows it as the root cause ("traceback : error: ...") instead of "To
    enable traceback see ...". torchrun prints that report after every rank has exited, so it is
    always the last thing on screen; this is the most a rank can do (docs/distributed.md)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):  # the first error of this rank wins, as @record does
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the line is already on stderr; the report then falls back to torchrun's generic text
