"""The teacher's targets, computed once into a float16 file on disk and read back per batch while distilling.

Layout of a cache folder `<root>/<key>/`: `logits.npy` (total tokens, 2) float16, the start and end logits
of every window one after another; `offsets.npy` (windows + 1,) int64, window i is
logits[offsets[i]:offsets[i + 1]]; `key.json`, what the key was made of.

A teacher with another tokenizer than the student's cannot give logits at the student's positions: it reads
each window in its own tokens, and its start and end distributions are carried to the student's tokens
(tinyqa/token_map.py). Its cache then holds those carried PROBABILITIES, at the run's --temperature, in
`probabilities.npy` of the same shape, and its key adds the teacher's tokenizer, the temperature and the
teacher's window length (the student's tokenizer is in the store's key already).

What keeps it trustworthy:
- the key hashes the CONTENT of the teacher's weights and config (sha256, never their names, sizes or
  times) with the feature store's key (the training files' content, the tokenizer, the window settings,
  --limit, --skip-bad) and the autocast dtype: a teacher replaced by another file of the same size and
  mtime (as `cp -p` or `rsync -a` leave it) can never reuse stale logits;
- the teacher's logits are checked to be finite as they are computed (a broken teacher is named, not the
  student's flags), the files' digests are recorded when the cache is built and checked whenever it is
  opened: a damaged, zeroed or truncated cache is refused with its path, never used;
- it is opened like the feature store (`open_cache` beside `open_store`): built in a unique temporary folder
  and renamed into place in one step, so its name only ever points at a complete cache; a lock (where the
  OS has flock) makes a second run that wants the same cache wait for the first instead of computing it twice;
- the whole file is reserved (posix_fallocate) before the teacher runs, and written with ordinary
  writes, not through a memory map: a full disk is an error at once, never a SIGBUS hours later;
- under DDP every rank computes a share of the batches into the same reserved file, so the teacher pass
  is split N ways rather than run by rank 0 while the others wait.
"""
import hashlib
import json
import os
from contextlib import ExitStack, nullcontext

import numpy as np
import torch

from . import distributed
from .catalog import cache_root
from .cpu import max_tokens_for
from .errors import TinyQAError
from .examples import ReadReport
from .features import length_sorted_batches, pad_batch
from .files import RowFile, building, digest, disk_error, lock, verify_digests
from .store import usable_chunks
from .token_map import carry
from .weights import load_model


def default_root():
    return os.path.join(cache_root(), "teacher-logits")


def cache_key(store, teacher_dir, amp_dtype, bridge=None, temperature=None):
    """(key, what it was made of): the store's key (training files' content, tokenizer, window settings,
    --limit, --skip-bad: what decides the windows), the teacher's weights and config, the autocast dtype;
    with a bridge (another tokenizer), the teacher's tokenizer, its window length and the temperature.
    Everything that changes a single target or the window order is in it."""
    weights = next((f for f in ("model.safetensors", "pytorch_model.bin")
                    if os.path.exists(os.path.join(teacher_dir, f))), None)
    teacher = {f: digest(os.path.join(teacher_dir, f)) for f in (weights, "config.json") if f}
    info = {"windows": store.key, "teacher": teacher, "autocast": str(amp_dtype)}
    if bridge is not None:
        info.update(targets="probabilities", temperature=temperature, teacher_max_len=bridge.teacher_max_len,
                    teacher_tokenizer=hashlib.sha256(bridge.teacher.to_str().encode()).hexdigest()[:24])
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:24], info


def targets_file(info) -> str:
    return "probabilities.npy" if info.get("targets") == "probabilities" else "logits.npy"


def is_complete(folder):
    return os.path.exists(os.path.join(folder, "key.json"))  # written last; the folder only appears whole (rename)


def open_cache(root, store, teacher_dir, amp_dtype=None, batch_size=64, dist=None, log=print, progress=True,
               bridge=None, temperature=None):
    """The teacher's targets for the store's windows: reused when the key matches, else computed once. Rank 0
    takes the lock (a second run wanting the same cache waits for it) and builds the folder; every rank
    computes its share into the one reserved file, and rank 0 renames it into place. bridge: a
    token_map.TokenBridge when the teacher has another tokenizer (its probabilities at `temperature` are
    cached, carried to the student's tokens), else None (its logits)."""
    dist = dist or distributed.Dist(0, 1, "cpu")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise TinyQAError(f"--teacher-cache {root}: cannot create it ({e.strerror})")
    key, info = cache_key(store, teacher_dir, amp_dtype, bridge, temperature)
    folder = os.path.join(root, key)
    what = "teacher probabilities (carried to the student's tokens)" if bridge else "teacher logits"
    with ExitStack() as held:
        tmp = None
        if dist.master and not is_complete(folder):
            held.enter_context(lock(folder + ".lock", log, f"the same {what}"))
            if not is_complete(folder):  # another run may have finished it while we waited
                log(f"computing {what} once into {folder}" + (f" ({dist.world} processes)" if dist.world > 1 else ""))
                tmp = held.enter_context(building(folder, is_complete))
                reserve(os.path.join(tmp, targets_file(info)), store.lengths)
        tmp = distributed.broadcast(dist, tmp)  # every rank learns whether, and where, to compute
        if tmp is None:
            log(f"{what}: reusing {folder}")
        else:
            teacher = load_model(teacher_dir, device=dist.device, verbose=dist.master)
            autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
            if bridge is None:
                batches = length_sorted_batches(store.lengths, batch_size, max_tokens_for(dist.device))
                compute(teacher, store, tmp, batches[dist.rank::dist.world], dist.device, autocast,
                        progress=progress and dist.master)
            else:
                cut = compute_carried(teacher, store, bridge, tmp, temperature, dist, batch_size, autocast,
                                      progress=progress and dist.master)
                cut = int(distributed.all_reduce_sum(dist, torch.tensor([cut]))[0])
                if cut:
                    log(f"notice: {cut} windows' stretches of context were longer than the teacher's "
                        f"{bridge.teacher_max_len} positions in its tokens: it read their beginning only, and the "
                        "student's tokens past it have no teacher mass")
            distributed.barrier(dist)  # every share is written
            if dist.master:
                finish(tmp, store.lengths, info)
    distributed.barrier(dist)  # renamed into place: complete for every rank
    return TeacherCache(folder, store.lengths)


def _reserve(f, size):
    """Allocate the file's blocks now, so that running out of disk is an error here and not later."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(f.fileno(), 0, size)
    else:
        f.truncate(size)  # sparse; the ordinary writes below still fail cleanly with ENOSPC


def reserve(path, lengths):
    """The .npy file at path with its blocks reserved for every window's two float16 targets (lengths: the
    windows' token counts), for compute() or compute_carried() to fill."""
    total = int(np.sum(lengths))
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (total, 2)})
        _reserve(f, f.tell() + total * 2 * 2)


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
                _check_finite(both, batch["attention_mask"].numpy().astype(bool), idx)
                for row, i in enumerate(idx):
                    f.seek(header + int(offsets[i]) * 4)  # 2 logits x 2 bytes per token
                    f.write(both[row, : offsets[i + 1] - offsets[i]].tobytes())
    except OSError as e:
        raise disk_error(path, e) from e


@torch.inference_mode()
def compute_carried(teacher, store, bridge, tmp, temperature, dist, batch_size, autocast, progress=True) -> int:
    """The teacher with another tokenizer: re-read the store's questions a chunk at a time (every rank reads
    them all and computes every world-th chunk), pair each student window with the teacher's window over the
    same text (bridge.pair), run the teacher on those, and write its start and end probabilities at
    `temperature`, carried to the student's tokens, into tmp's probabilities.npy at the windows' places.
    Returns how many windows the teacher could read only the beginning of."""
    from tqdm import tqdm
    offsets = np.concatenate([[0], np.cumsum(store.lengths)])
    example_of = store.windows[:, 0]
    path, done, cut = os.path.join(tmp, "probabilities.npy"), 0, 0
    try:
        with open(path, "r+b") as f, tqdm(total=len(store), desc="teacher probabilities", unit=" windows",
                                           disable=not progress) as bar:
            _read_header(f)
            header = f.tell()
            for c, chunk in enumerate(usable_chunks(*store.source, ReadReport())):
                lo, hi = np.searchsorted(example_of, [done, done + len(chunk)])  # the chunk's windows
                done += len(chunk)
                if c % dist.world != dist.rank:
                    continue
                pairs = bridge.pair(chunk)
                _check_pairs(store, pairs, lo, hi, offsets)
                cut += sum(p.cut for p in pairs)
                for idx in length_sorted_batches([len(p.teacher_ids) for p in pairs], batch_size,
                                                 max_tokens_for(dist.device)):
                    for k, both in zip(idx, _teacher_probabilities(teacher, [pairs[k] for k in idx],
                                                                   [lo + k for k in idx], temperature, dist.device,
                                                                   autocast)):
                        f.seek(header + int(offsets[lo + k]) * 4)  # 2 probabilities x 2 bytes per token
                        f.write(both.astype(np.float16).tobytes())
                bar.update(hi - lo)
    except OSError as e:
        raise disk_error(path, e) from e
    return cut


def _check_pairs(store, pairs, lo, hi, offsets):
    """The student windows bridge.pair cut are the store's windows lo..hi, token for token (the same
    questions, tokenizer and settings make them; this says so before the teacher's work is spent)."""
    if len(pairs) != hi - lo or any(not np.array_equal(p.student_ids, store.ids.read(offsets[lo + k], offsets[lo + k + 1]))
                                    for k, p in enumerate(pairs)):
        raise TinyQAError(f"{store.folder}: the training windows cut again for the teacher differ from the feature "
                          f"store's (windows {lo}..{hi}): delete the store folder to rebuild it")


def _teacher_probabilities(teacher, pairs, windows, temperature, device, autocast):
    """Per paired window (the store's windows `windows`), the teacher's start and end probabilities at
    `temperature` over its own window, carried to the student's tokens: (student tokens, 2) float64 each."""
    batch = pad_batch([(p.teacher_ids, p.teacher_types) for p in pairs], teacher.config.pad_token_id)
    with autocast:
        out = teacher(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")))
    both = torch.stack([out.start_logits, out.end_logits], dim=-1).float().cpu().numpy()  # (B, Lt, 2)
    _check_finite(both, batch["attention_mask"].numpy().astype(bool), windows)
    for row, p in enumerate(pairs):
        x = both[row, : len(p.teacher_ids)].astype(np.float64) / temperature
        prob = np.exp(x - x.max(axis=0))
        prob /= prob.sum(axis=0)
        yield np.stack(carry(prob[:, 0], prob[:, 1], p.start_to, p.end_to, len(p.student_ids)), axis=1)


def _check_finite(logits, real, idx):
    """A teacher whose logits are NaN or infinite (or beyond float16's 65504) is broken: said here, naming
    the teacher, rather than later as a student loss gone NaN."""
    bad = ~np.isfinite(logits).all(axis=-1) & real  # (B, L): real tokens only
    if bad.any():
        row = int(np.nonzero(bad.any(axis=1))[0][0])
        raise TinyQAError(f"the teacher gives NaN or infinite logits (or beyond float16's range) on training window "
                          f"{idx[row]}: the teacher checkpoint is broken (a diverged run?): use another --teacher")


def finish(tmp, lengths, info):
    """Complete the folder: offsets.npy, then key.json (what the key was made of)."""
    np.save(os.path.join(tmp, "offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    info = dict(info, digests={name: digest(os.path.join(tmp, name)) for name in (targets_file(info), "offsets.npy")})
    with open(os.path.join(tmp, "key.json"), "w") as f:
        json.dump(info, f, indent=2)


class TeacherCache:
    """A built cache, its files verified against the digests recorded when it was built; `batch` reads
    windows' targets by row with pread. `probabilities`: whether they are the teacher's carried
    probabilities (another tokenizer) rather than its logits."""

    def __init__(self, folder, lengths):
        try:
            with open(os.path.join(folder, "key.json")) as f:
                info = json.load(f)
            verify_digests(folder, info["digests"], "teacher cache")
            path = os.path.join(folder, targets_file(info))
            with open(path, "rb") as f:  # read per window with pread, not memory-mapped (RowFile says why)
                shape, dtype = _read_header(f)
                self.targets = RowFile(path, dtype, shape[1:], start=f.tell())
            self.offsets = np.load(os.path.join(folder, "offsets.npy"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TinyQAError(f"{folder}: damaged teacher cache ({e}); delete the folder to recompute it")
        self.folder, self.probabilities = folder, info.get("targets") == "probabilities"
        if len(self.offsets) != len(lengths) + 1 or not np.array_equal(np.diff(self.offsets), lengths) \
                or len(self.targets) != self.offsets[-1]:
            raise TinyQAError(f"{folder}: the teacher cache does not match the training windows; "
                              "delete the folder to recompute it")

    def batch(self, idx, L):
        """(start, end) float32 tensors (B, L) for the windows idx, zero beyond each window (masked anyway)."""
        out = np.zeros((len(idx), L, 2), dtype=np.float32)
        for row, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[row, : b - a] = self.targets.read(a, b)
        # its digest matched, so the file was written so: never trained on
        if not np.isfinite(out).all() or (self.probabilities and ((out < 0) | (out > 1)).any()):
            raise TinyQAError(f"{self.folder}: the teacher cache holds NaN or infinite logits or probabilities out "
                              "of [0, 1]; delete the folder to recompute it")
        t = torch.from_numpy(out)
        return t[..., 0], t[..., 1]
