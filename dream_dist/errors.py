"""Errors a user can act on, and the exit path every entry point shares."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from dream_dist.config import ConfigError

EXIT_USAGE = 2
"""Exit status for a bad flag, config file or input file."""


class InputError(ValueError):
    """Unusable input data: names the file, and the row or column if known."""


def run_entry_point(main: Callable[[list[str]], int | None], prog: str) -> None:
    """Runs ``main(argv)`` and exits; ConfigError/InputError exit 2 with one line."""
    try:
        status = main(sys.argv[1:])
    except (ConfigError, InputError) as err:
        logging.getLogger(prog).debug("usage error", exc_info=True)
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(status or 0)
