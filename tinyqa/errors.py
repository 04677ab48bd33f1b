"""One error type for bad input, and the CLI wrapper that turns it into one line and an exit code.

Library code raises `TinyQAError` with a message that says what was wrong, where (file, line, field),
and what to do; scripts wrap their body in `cli_errors()` so the user sees that line, not a traceback.
"""
import sys
from contextlib import contextmanager


class TinyQAError(Exception):
    pass


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
