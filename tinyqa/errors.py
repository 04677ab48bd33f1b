"""One error type for bad input, and the CLI wrapper that turns it into one line and exit code 2.

Library code raises `TinyQAError` with a message that says what was wrong, where (file, line, field),
and what to do; scripts wrap their body in `cli_errors()` so the user sees that line, not a traceback.
"""
import sys
from contextlib import contextmanager


class TinyQAError(Exception):
    pass


@contextmanager
def cli_errors():
    try:
        yield
    except TinyQAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
