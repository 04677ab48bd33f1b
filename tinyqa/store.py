"""The training windows on disk: featurized once in a stream, then read by every epoch, run and rank.

MRQA's train split is 516,819 questions and about a million windows; held as Python objects that is tens of
GB per process. Instead the examples are read, tokenized and cut into windows a chunk at a time
(tinyqa/features.py's `cut_windows`, what `featurize` makes its windows and labels with), and each chunk's windows
are appended to flat arrays on disk. Layout of a store folder `<root>/<key>/`:
    ids.bin       (tokens,) uint16, or int32 for vocabularies over 65,536: every window's token ids, in order
    offsets.npy   (windows + 1,) int64: window i is ids[offsets[i]:offsets[i + 1]]
    windows.npy   (windows, 4) int32: example index, start label, end label, tokens before the context
                  (special tokens and question: what the token types are rebuilt from)
    key.json      what the key was made of, and the counts
Memory while building is one chunk of examples; afterwards a store costs its page cache, shared by every
process that reads it: the small arrays (offsets and windows: 24 bytes a window) are loaded, the token ids read
per window with pread (tinyqa/files.py's RowFile: a memory map's touched pages would count in each rank's RSS).

What keeps it trustworthy, as for the teacher-logit cache (tinyqa/teacher_cache.py):
- the key hashes the training files' content, the whole tokenizer (not only its vocabulary: merges and
  normalizer change the tokens too), the featurizer settings, --limit and --skip-bad;
- it is built in a unique temporary folder and renamed into place, so its name only ever points at a
  complete store; a killed build leaves a temporary folder that the next build ignores (and removes
  when it is old);
- a lock makes other processes that want the same store (the other DDP ranks, another run) wait for the
  one building it, then read it.
"""
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .catalog import cache_root
from .data import stream_files
from .errors import TinyQAError
from .examples import ReadReport
from .features import cut_windows, encode, pad_batch, pair_layout
from .files import RowFile, building, chunks, digest, lock, verify_digests

CHUNK_QUESTIONS = 2000  # examples featurized together: bounds the memory of a build


def default_root():
    return os.path.join(cache_root(), "features")


def store_key(files, tokenizer, fcfg, limit, skip_bad):
    """(key, what it was made of): everything that changes a window, a label or their order."""
    info = {"data": [[os.path.basename(p), digest(p)] for p in files], "limit": limit, "skip_bad": skip_bad,
            "tokenizer": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:24],
            "featurizer": [fcfg.max_seq_len, fcfg.doc_stride, fcfg.max_question_len], "format": 1}
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:24], info


def is_complete(folder):
    return os.path.exists(os.path.join(folder, "key.json"))  # written last, inside the temporary folder


def open_store(root, files, tokenizer, fcfg, limit=None, skip_bad=False, log=print, progress=True, vocab_size=None):
    """The store of these files and settings: reused when it exists, else built first (by whichever process
    takes the lock first; the others wait for it). Its files are checked against the digests recorded at
    build time, and its token ids against the model's vocab_size, before any of it is used."""
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise TinyQAError(f"--feature-store {root}: cannot create it ({e.strerror})")
    key, info = store_key(files, tokenizer, fcfg, limit, skip_bad)
    folder = os.path.join(root, key)
    reused = is_complete(folder)
    if not reused:
        with lock(folder + ".lock", log, "the same feature store"):
            if not is_complete(folder):  # another process may have built it while we waited
                log(f"featurizing the training data once into {folder}")
                build(files, tokenizer, fcfg, limit, skip_bad, folder, info, log, progress)
    else:
        log(f"training windows: reusing {folder}")
    store = FeatureStore(folder, pair_layout(tokenizer))
    store.source = (files, limit, skip_bad)  # what usable_chunks re-reads its questions from
    if vocab_size is not None and store.info["max_id"] >= vocab_size:
        raise TinyQAError(f"{folder}: the feature store holds token id {store.info['max_id']} but the model has "
                          f"{vocab_size} embeddings: not this model's store; delete the folder to rebuild it")
    left_out = {k: store.info.get(k, 0) for k in ("no_span", "bad_span", "skipped")}
    if reused and any(left_out.values()):  # said when it was built; said again, so no run is silent about it
        log(f"notice: the store leaves out {left_out['no_span']} question(s) without an answer span, "
            f"{left_out['bad_span']} whose span does not hold their answer text and {left_out['skipped']} "
            "malformed line(s) or question(s) skipped with --skip-bad")
    return store


def build(files, tokenizer, fcfg, limit, skip_bad, folder, info, log=print, progress=True):
    """Featurize the examples of `files` a chunk at a time into a new store at `folder`. Questions without
    an answer span are left out with a notice (they would teach "no answer"), like malformed lines (which
    are errors, or with skip_bad counted)."""
    from tqdm import tqdm
    layout = pair_layout(tokenizer)
    dtype = np.uint16 if tokenizer.get_vocab_size(with_added_tokens=True) <= 65536 else np.int32
    report, left_out = ReadReport(), {"no_span": [], "bad_span": []}  # the first few qids of each
    lengths, meta, n = [], [], {"examples": 0, "tokens": 0, "max_id": 0, "no_span": 0, "bad_span": 0}
    with building(folder, is_complete) as tmp, tqdm(desc="featurize", unit=" windows", disable=not progress) as bar:
        with open(os.path.join(tmp, "ids.bin"), "wb") as f, ThreadPoolExecutor(max_workers=1) as tokenizing:

            def write(examples, encoding):  # one chunk's windows appended to ids.bin, lengths and meta
                table = cut_windows(examples, encoding.result(), layout, fcfg)
                f.write(table.input_ids.astype(dtype).tobytes())
                n["max_id"] = max(n["max_id"], int(table.input_ids.max(initial=0)))
                lengths.append(np.diff(table.bounds))
                meta.append(np.stack([n["examples"] + table.example_index, table.start_label, table.end_label,
                                      table.n_prefix], axis=1).astype(np.int32))
                n["tokens"] += len(table.input_ids)
                n["examples"] += len(examples)
                bar.update(len(table))

            pending = None  # the previous chunk, whose tokenization runs while this one is read
            for keep in usable_chunks(files, limit, skip_bad, report, n, left_out):
                # encode_batch releases the GIL: chunk i + 1 is tokenized (in Rust, on the other core) while
                # chunk i is cut into windows and written here, and chunk i + 2 read and checked.
                current = (keep, tokenizing.submit(encode, keep, tokenizer, words=False))
                if pending is not None:
                    write(*pending)
                pending = current
            if pending is not None:
                write(*pending)
        bar.close()
        report.print(log)
        for kind, what in (("no_span", "have no answer span (detected_answers.char_spans)"),
                           ("bad_span", "have an answer span that does not hold their answer text")):
            if n[kind]:
                log(f"notice: {n[kind]} training questions {what} and are left out: "
                    f"{', '.join(left_out[kind])}{' ...' * (n[kind] > len(left_out[kind]))}")
        if not n["examples"]:
            raise TinyQAError(f"--train {' '.join(map(str, files))}: no question has an answer span "
                              "(detected_answers): there is nothing to train on")
        lengths = np.concatenate(lengths)
        np.save(os.path.join(tmp, "offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        np.save(os.path.join(tmp, "windows.npy"), np.concatenate(meta))
        info.update(dtype=np.dtype(dtype).name, windows=len(lengths), **n, skipped=len(report.skipped),
                    digests={name: digest(os.path.join(tmp, name)) for name in ("ids.bin", "offsets.npy", "windows.npy")})
        with open(os.path.join(tmp, "key.json"), "w") as f:
            json.dump(info, f, indent=2)


def usable_chunks(files, limit, skip_bad, report, n=None, left_out=None):
    """The training questions the store's windows are made of, in the store's order, a chunk at a time:
    what `build` featurizes, and what the teacher cache re-reads when the teacher has another tokenizer
    (tinyqa/teacher_cache.py). Those left out are counted in n and left_out (see _usable)."""
    n = {"no_span": 0, "bad_span": 0} if n is None else n
    left_out = {"no_span": [], "bad_span": []} if left_out is None else left_out
    examples = (ex for _, ex in stream_files(files, limit, skip_bad, report, flag="--train"))
    for chunk in chunks(examples, CHUNK_QUESTIONS):
        yield _usable(chunk, n, left_out)


def _usable(chunk, n, left_out):
    """The chunk's questions that can teach a span: with one, and one that holds their answer's text (a span
    computed on another version of the context would train a wrong label). The others are counted in n and
    their first qids kept, to be reported."""
    keep = []
    for ex in chunk:
        kind = "no_span" if ex.span is None else None if ex.span_matches else "bad_span"
        if kind is None:
            keep.append(ex)
            continue
        n[kind] += 1
        if len(left_out[kind]) < 5:
            left_out[kind].append(ex.qid)
    return keep


class FeatureStore:
    """A built store: len(), the windows' lengths, and padded batches read straight from disk."""

    def __init__(self, folder, layout):
        try:
            with open(os.path.join(folder, "key.json")) as f:
                self.info = json.load(f)
            self.offsets = np.load(os.path.join(folder, "offsets.npy"))
            self.windows = np.load(os.path.join(folder, "windows.npy"))
            self.ids = RowFile(os.path.join(folder, "ids.bin"), self.info["dtype"])
            verify_digests(folder, self.info["digests"], "feature store")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TinyQAError(f"{folder}: damaged feature store ({e}); delete the folder to rebuild it")
        if len(self.windows) != len(self.offsets) - 1 or len(self.ids) != self.offsets[-1]:
            raise TinyQAError(f"{folder}: damaged feature store (windows, offsets and ids disagree); delete it to rebuild")
        self.folder, self.layout, self.lengths = folder, layout, np.diff(self.offsets)
        self.key = os.path.basename(os.path.normpath(folder))  # what the teacher cache keys on

    def __len__(self):
        return len(self.windows)

    def batch(self, idx, pad_id, with_labels=True) -> dict:
        """Windows idx padded to the longest of them (features.pad_batch): input_ids, attention_mask,
        token_type_ids (B, L) and, with_labels, start_positions and end_positions (B,)."""
        lay, windows = self.layout, []
        for i in idx:
            ids = self.ids.read(self.offsets[i], self.offsets[i + 1])
            types = None
            if lay.max_type:  # BERT-style segments, rebuilt from where the context starts
                n_prefix = int(self.windows[i, 3])
                types = lay.type_ids(n_prefix - len(lay.before) - len(lay.between), len(ids) - n_prefix - len(lay.after))
            windows.append((ids, types))
        labels = (self.windows[idx, 1], self.windows[idx, 2]) if with_labels else None
        return pad_batch(windows, pad_id, labels)
