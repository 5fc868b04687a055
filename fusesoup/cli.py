"""What every stage script shares: expected failures end in one clear line on stderr, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from fusesoup.params import ParamsError
from fusesoup.storage import StorageError


class StageError(RuntimeError):
    """A stage cannot go on because of its input (a bad record, a missing model...); the message says where."""


EXPECTED_ERRORS = (ParamsError, StorageError, StageError)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); on an expected error print `error: <message>` and exit with status 2."""
    try:
        main()
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
