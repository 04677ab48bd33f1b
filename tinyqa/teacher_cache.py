"""The teacher's logits, computed once into a float16 file on disk and read back per batch while distilling.

Layout of a cache folder `<root>/<key>/`: `logits.npy` (total tokens, 2) float16, the start and end logits
of every window one after another; `offsets.npy` (windows + 1,) int64, window i is
logits[offsets[i]:offsets[i + 1]]; `key.json`, what the key was made of.

What keeps it trustworthy:
- the key hashes the CONTENT of the teacher's weights and config and of the training files (sha256,
  remembered per file identity in `<root>/hashes.json` so a GB-sized teacher is hashed once), with the
  tokenizer, the featurizer settings, --limit, --skip-bad and the autocast dtype: replaced weights with
  the same size and mtime can never reuse stale logits;
- a cache is built in a unique temporary folder and renamed into place in one step, so its name only
  ever points at a complete cache; a lock (where the OS has flock) makes a second run that wants the
  same cache wait for the first instead of computing it twice;
- the whole file is reserved (posix_fallocate) before the teacher runs, and written with ordinary
  writes, not through a memory map: a full disk is an error at once, never a SIGBUS hours later;
- under DDP every rank computes a share of the batches into the same reserved file (start, compute,
  finish), so the teacher pass is split N ways rather than run by rank 0 while the others wait.
"""
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np
import torch

from .errors import TinyQAError
from .features import length_sorted_batches
from .files import RowFile, _umask, disk_error, file_sha256


def default_root():
    return os.path.join(os.environ.get("TINYQA_CACHE") or os.path.expanduser("~/.cache/tinyqa"), "teacher-logits")


def cache_key(root, train_files, teacher_dir, tokenizer_fp, fcfg, limit, skip_bad, amp_dtype):
    """(key, what it was made of). Everything that changes a single logit or the window order is in it."""
    memo = os.path.join(root, "hashes.json")
    weights = next((f for f in ("model.safetensors", "pytorch_model.bin")
                    if os.path.exists(os.path.join(teacher_dir, f))), None)
    teacher = {f: file_sha256(os.path.join(teacher_dir, f), memo) for f in (weights, "config.json") if f}
    info = {"data": [[os.path.basename(p), file_sha256(p, memo)] for p in train_files], "limit": limit,
            "skip_bad": skip_bad, "teacher": teacher, "tokenizer": tokenizer_fp,
            "featurizer": [fcfg.max_seq_len, fcfg.doc_stride, fcfg.max_query_length], "autocast": str(amp_dtype)}
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:24], info


def is_complete(folder):
    return os.path.exists(os.path.join(folder, "offsets.npy"))  # the folder only appears whole (rename)


@contextmanager
def lock(path, log=print):
    """An exclusive lock on `path` for as long as the block runs; the OS drops it if the process dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): two runs may both compute; each renames a complete copy
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run that is computing the same teacher logits (lock {path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _reserve(f, size):
    """Allocate the file's blocks now, so that running out of disk is an error here and not later."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(f.fileno(), 0, size)
    else:
        f.truncate(size)  # sparse; the ordinary writes below still fail cleanly with ENOSPC


def start(folder, lengths):
    """A unique temporary folder beside `folder` holding logits.npy, its blocks reserved for every window
    (lengths: the windows' token counts). Returns its path; compute() fills it, finish() renames it."""
    total = int(np.sum(lengths))
    root = os.path.dirname(folder)
    tmp = tempfile.mkdtemp(dir=root, prefix=os.path.basename(folder) + ".tmp-")  # unique per run
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a shared cache must stay readable by others
        with open(os.path.join(tmp, "logits.npy"), "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (total, 2)})
            _reserve(f, f.tell() + total * 2 * 2)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(folder, e) from e
    return tmp


def _read_header(f):
    """(shape, dtype) of the .npy file open as f, which is left at its first byte of data."""
    np.lib.format.read_magic(f)
    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    return shape, dtype


@torch.inference_mode()
def compute(teacher, store, tmp, batches, device, autocast, progress=True):
    """Run the teacher over the windows of `batches` (lists of window indices into the feature store) and
    write their logits into tmp's logits.npy, each at its own place: DDP ranks each compute a share of the
    batches into the same file."""
    from tqdm import tqdm
    offsets = np.concatenate([[0], np.cumsum(store.lengths)])
    path = os.path.join(tmp, "logits.npy")
    try:
        with open(path, "r+b") as f:
            _read_header(f)
            header = f.tell()  # where the logits start
            for idx in tqdm(batches, desc="teacher logits", disable=not progress):
                batch = store.batch(idx, teacher.config.pad_token_id, with_labels=False)
                with autocast:
                    out = teacher(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["token_type_ids"].to(device))
                both = torch.stack([out.start_logits, out.end_logits], dim=-1).float().cpu().numpy()  # (B, L, 2)
                both = both.astype(np.float16)
                for row, i in enumerate(idx):
                    f.seek(header + int(offsets[i]) * 4)  # 2 logits x 2 bytes per token
                    f.write(both[row, : offsets[i + 1] - offsets[i]].tobytes())
    except OSError as e:
        raise disk_error(path, e) from e


def finish(tmp, folder, lengths, info):
    """Complete the temporary folder (offsets.npy, key.json) and rename it into place."""
    try:
        np.save(os.path.join(tmp, "offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        with open(os.path.join(tmp, "key.json"), "w") as f:
            json.dump(info, f, indent=2)
        try:
            os.rename(tmp, folder)  # atomic; refused if another run (without a lock) got there first
        except OSError:
            if not is_complete(folder):
                raise
    except OSError as e:
        raise disk_error(folder, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class TeacherCache:
    def __init__(self, folder, lengths):
        try:
            path = os.path.join(folder, "logits.npy")
            with open(path, "rb") as f:  # read per window with pread, not memory-mapped (RowFile says why)
                shape, dtype = _read_header(f)
                self.logits = RowFile(path, dtype, shape[1:], start=f.tell())
            self.offsets = np.load(os.path.join(folder, "offsets.npy"))
        except (OSError, ValueError) as e:
            raise TinyQAError(f"{folder}: damaged teacher cache ({e}); delete the folder to recompute it")
        if len(self.offsets) != len(lengths) + 1 or not np.array_equal(np.diff(self.offsets), lengths) \
                or len(self.logits) != self.offsets[-1]:
            raise TinyQAError(f"{folder}: the teacher cache does not match the training windows; "
                              "delete the folder to recompute it")

    def batch(self, idx, L):
        """(start, end) float32 tensors (B, L) for the windows idx, zero beyond each window (masked anyway)."""
        out = np.zeros((len(idx), L, 2), dtype=np.float32)
        for row, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[row, : b - a] = self.logits.read(a, b)
        t = torch.from_numpy(out)
        return t[..., 0], t[..., 1]
