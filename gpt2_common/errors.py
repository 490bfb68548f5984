"""The one exception type that reaches the user as a single line instead of a traceback."""

import os
import sys
from typing import Callable

from gpt2_common import startup


class UserError(Exception):
    """A problem the user can fix (a config key, a missing file, a wrong shape); the message says how.

    `exit_at_once`: the process ends right after the line, without waiting for its other threads (a failed
    asynchronous checkpoint save leaves orbax threads that wait forever for the save's other half)."""

    exit_at_once = False


def as_typed(message: str) -> str:
    """`message` with the paths under the working directory shown relative to it, as the user typed them: the
    scripts make every path argument absolute at the edge (gpt2_common.cli.path_arg), but a user who typed
    `runs/x` should read `runs/x` back."""
    cwd = os.getcwd()
    if cwd == os.sep:
        return message
    return message.replace(cwd + os.sep, "")


def run_cli(main: Callable[[], object]) -> None:
    """Runs a script's main; a UserError is printed as one line on stderr and exits with status 2."""
    startup.script_process()  # its frameworks load faster (gpt2_common/startup.py)
    try:
        main()
    except UserError as err:
        print(f"error: {as_typed(str(err))}", file=sys.stderr)
        if err.exit_at_once:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
