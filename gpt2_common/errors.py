"""The one exception type that reaches the user as a single line instead of a traceback."""

import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (a config key, a missing file, a wrong shape); the message says how."""


def run_cli(main: Callable[[], object]) -> None:
    """Runs a script's main; a UserError is printed as one line on stderr and exits with status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
