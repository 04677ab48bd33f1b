"""One error type for bad input, and the CLI wrapper that turns it into one line and an exit code.

Library code raises `TinyQAError` with a message that says what was wrong, where (file, line, field),
and what to do; scripts wrap their body in `cli_errors()` so the user sees that line, not a traceback.
"""
import os
import sys
from contextlib import contextmanager


class TinyQAError(Exception):
    pass


def missing(path, what="no such file") -> str:
    """Why `path` cannot be opened though it was named: `what` (no such file or directory), or, for a name
    that is there but leads nowhere, a broken symbolic link or a loop of them (which os.path.exists calls
    missing too)."""
    if os.path.islink(path):
        return "a broken symbolic link (or a loop of links): it leads to no file"
    return what


@contextmanager
def cli_errors():
    """TinyQAError -> `error: ...` and exit 2; an OSError that got through (a full disk, a permission, a
    vanished file: the environment, not the input) -> one line and exit 1; Ctrl-C -> exit 130."""
    try:
        yield
    except TinyQAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
