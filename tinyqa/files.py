"""Files that a kill or a full disk never leaves half-written, content hashes, locks, and arrays read by rows.

- `atomic_write(path)`: write to a unique temporary name in the same folder, then `os.replace` it onto
  `path`. A reader (or a later run) sees the old file or the new one, never a truncated mix; an error or
  a kill mid-write leaves the old file as it was.
- `building(folder)`: the same for a whole folder (the feature store, the teacher's logits): built under a
  unique temporary name beside it and renamed into place, so its name only ever points at a complete one.
- `lock(path)`: one process at a time builds such a folder; the others wait, then read it.
- `digest(path)`: a file's content hash: what keys those caches (never a file's name, size or times, which
  a copy with `cp -p` or `rsync -a` keeps) and what they are verified against when read.
- `RowFile`: a flat on-disk array (the feature store's token ids, the teacher's logits) read by row ranges.
"""
import errno
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager

import numpy as np

from .errors import TinyQAError


def disk_error(path, e):
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return TinyQAError(f"{path}: the disk is full ({e.strerror}); free space and run again")
    return TinyQAError(f"{path}: cannot write ({getattr(e, 'strerror', None) or e})")


@contextmanager
def atomic_write(path, mode="w", encoding="utf-8"):
    """with atomic_write("metrics.json") as f: json.dump(m, f)  -- all or nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise disk_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, obj, **kw):
    with atomic_write(path) as f:
        json.dump(obj, f, **kw)


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def digest(path, algorithm="sha256") -> str:
    """The hex digest of a file's bytes, read a MB at a time."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def lock(path, log=print, what="the same cache"):
    """An exclusive lock on `path` for as long as the block runs; the OS drops it if the process dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): two runs may both build; each renames a complete copy
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is building {what} (lock {path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def building(folder, is_complete):
    """with building(folder, is_complete) as tmp: write tmp's files -- then tmp becomes `folder` in one rename.

    tmp is a unique folder beside `folder`; a kill leaves only it, which later builds ignore (and remove
    once it is an hour old). If another process (without the lock) renamed a complete `folder` first,
    ours is dropped; a `folder` that is there but incomplete (no key file) is replaced. An error removes
    tmp and is raised; an OSError as one line (a full disk says so)."""
    root = os.path.dirname(folder)
    for old in glob.glob(glob.escape(folder) + ".tmp-*"):
        if time.time() - os.path.getmtime(old) > 3600:
            shutil.rmtree(old, ignore_errors=True)
    try:
        tmp = tempfile.mkdtemp(dir=root, prefix=os.path.basename(folder) + ".tmp-")
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a shared cache must stay readable by others
            yield tmp
            fsync_tree(tmp)  # every byte on disk before the rename makes the folder visible
            try:
                os.rename(tmp, folder)  # atomic; refused if another process got there first
            except OSError:
                if is_complete(folder):
                    return
                shutil.rmtree(folder)  # a folder of that name that never completed (or lost its key file)
                os.rename(tmp, folder)
            fsync_tree(root, files=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    except OSError as e:
        raise disk_error(folder, e) from e


def fsync_tree(folder, files=True):
    """fsync every file in folder (not below it) and the folder itself: what a rename makes visible must
    be on disk first, and the rename itself must be on disk before a cache or checkpoint is reported."""
    if files:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    if hasattr(os, "O_DIRECTORY"):  # directories cannot be opened for fsync on Windows
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def verify_digests(folder, digests, what):
    """Refuse a cache folder whose files are not the bytes recorded when it was built (damaged, zeroed,
    truncated or replaced since), naming the folder and the fix."""
    for name, want in digests.items():
        path = os.path.join(folder, name)
        try:
            got = digest(path)
        except OSError as e:
            got = f"unreadable ({e.strerror})"
        if got != want:
            raise TinyQAError(f"{folder}: damaged {what}: {name} is not what was written when it was built; "
                              "delete the folder and run again to rebuild it")


def chunks(iterable, n):
    """Lists of n items of the iterable (the last may be shorter), read lazily."""
    chunk = []
    for x in iterable:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# What json.loads raises on text it will not turn into a value: JSONDecodeError (a ValueError) for bad
# syntax, another ValueError for an integer of more than 4,300 digits, RecursionError for deep nesting.
JSON_ERRORS = (ValueError, RecursionError)


def json_problem(e) -> str:
    """One line saying why json.loads refused a text (one of JSON_ERRORS)."""
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if isinstance(e, RecursionError):
        return "not usable JSON (nested too deeply)"
    return f"not usable JSON ({str(e).split(':')[0]})"


def finite(x):
    """x with every non-finite float replaced by None: JSON (RFC 8259) has no NaN or Infinity."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def strict_json(obj) -> str:
    """JSON that any parser accepts: non-finite floats become null, and json.dumps refuses any left."""
    return json.dumps(finite(obj), ensure_ascii=False, allow_nan=False)


def read_json(path, what="JSON", kind=dict):
    """A JSON file we wrote (args.json, config.json): a truncated or hand-broken one is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, *JSON_ERRORS) as e:
        why = json_problem(e) if isinstance(e, JSON_ERRORS) and not isinstance(e, UnicodeDecodeError) else e
        raise TinyQAError(f"{path}: cannot read {what} ({why}); the file is damaged: restore or delete it")
    if not isinstance(value, kind):
        raise TinyQAError(f"{path}: {what} must be a JSON {kind.__name__}, not a {type(value).__name__}")
    return value


class RowFile:
    """Rows [a, b) of a flat array stored in a file from byte `start` on, read with pread: `read(a, b)`.

    Why not np.memmap: every page of a memory map that a process touches counts in its resident memory
    (VmRSS) until the kernel reclaims it, so an epoch over a 0.6 GB store and a 1.2 GB logit file (MRQA
    train) would grow each rank's RSS by 1.8 GB. Bytes read with pread sit in the kernel's page cache
    instead, shared by every process and rank that reads the file, and dropped under memory pressure like
    a map's pages; the process holds only the batch it asked for. One system call per window costs
    microseconds: well under 1 ms per 32-window batch, against a training step's hundreds."""

    def __init__(self, path, dtype, row_shape=(), start=0):
        self.path, self.dtype, self.row_shape, self.start = path, np.dtype(dtype), tuple(row_shape), start
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.file = open(path, "rb", buffering=0)  # closed with the object
        self.rows = (os.fstat(self.file.fileno()).st_size - start) // self.row_bytes

    def __len__(self):
        return self.rows

    def read(self, a, b) -> np.ndarray:
        a, b = int(a), int(b)
        if not 0 <= a <= b <= self.rows:
            raise TinyQAError(f"{self.path}: rows {a}:{b} asked of a file of {self.rows}; the file is damaged: delete it")
        size, at = (b - a) * self.row_bytes, self.start + a * self.row_bytes
        if hasattr(os, "pread"):
            data = os.pread(self.file.fileno(), size, at)
        else:  # Windows has no pread; the handle is this object's own, so seek and read are as good
            self.file.seek(at)
            data = self.file.read(size)
        return np.frombuffer(data, self.dtype).reshape(b - a, *self.row_shape)
