"""Checks made at the entry, before any work: output paths, input files, devices, window lengths.

Every command line and API call goes through these once, at its start, so that bad input costs a
second and one line (`error: --batch-size: must be a positive integer, got 0`), not an hour of work
followed by a traceback or, worse, a silently wrong result.
"""
import os

import torch

from .errors import TinyQAError, missing


# --- output paths: checked before the work, written atomically after it (files.atomic_write)

def check_output_file(path, flag):
    """A file we will write at the end: its folder must exist and be writable, and it must not be a folder."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise TinyQAError(f"{flag} {path}: is a directory; give a file name")
    if not os.path.isdir(folder):
        raise TinyQAError(f"{flag} {path}: no such directory {folder}; create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise TinyQAError(f"{flag} {path}: not writable (permission denied)")


def check_output_dir(path, flag):
    """A folder we will create (with its parents) or write into."""
    if (os.path.exists(path) or os.path.islink(path)) and not os.path.isdir(path):
        raise TinyQAError(f"{flag} {path}: " + (missing(path) if os.path.islink(path) else "exists and is not a directory"))
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest existing ancestor must let us create the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise TinyQAError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TinyQAError(f"{flag} {path}: {existing} is not writable (permission denied)")


def check_distinct_outputs(outputs: dict, inputs=()):
    """No output may overwrite another output or one of the inputs (e.g. --output equal to a --data file)."""
    seen = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise TinyQAError(f"{seen[real]} and {flag} are the same file {path}: give them different names")
        if any(os.path.realpath(p) == real for p in inputs):
            raise TinyQAError(f"{flag} {path} is also an input file: it would be overwritten; write elsewhere")
        seen[real] = flag


def check_input_files(paths, flag):
    """Files we will read: each must exist and be a readable file (a folder is refused here, not mid-read)."""
    seen = set()
    for path in paths or ():
        if os.path.realpath(path) in seen:
            raise TinyQAError(f"{flag} {path}: given twice")
        seen.add(os.path.realpath(path))
        if os.path.isdir(path):
            raise TinyQAError(f"{flag} {path}: is a directory, not a file")
        if not os.path.exists(path):
            raise TinyQAError(f"{flag} {path}: {missing(path)}")
        if not os.access(path, os.R_OK):
            raise TinyQAError(f"{flag} {path}: not readable (permission denied)")


# --- devices and dtypes: one check that load_model, evaluate.py and training all go through

def check_device(device, dtype=None, quantize=None, flag="--device"):
    """Refuse a device this torch cannot use, and dtype/quantisation combinations that cannot work."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TinyQAError(f"{flag} {device!r}: unknown device; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise TinyQAError(f"{flag} {device}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TinyQAError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise TinyQAError(f"{flag} {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise TinyQAError(f"{flag} {device}: tinyqa runs on cpu, cuda or mps")
    if quantize is not None:
        if quantize != "int8":
            raise TinyQAError(f"--quantize {quantize}: only int8 is supported")
        if dev.type != "cpu":
            raise TinyQAError("--quantize int8 is CPU-only (dynamic quantisation); drop it, or use --device cpu")
        if dtype not in (None, torch.float32):
            raise TinyQAError(f"--quantize int8 quantises fp32 weights; it cannot be combined with --dtype "
                              f"{str(dtype).removeprefix('torch.')}: drop one of them")
    return dev


# --- the model's limits

def check_featurizer(max_seq_len, doc_stride, max_question_len, n_special=3):
    """Windows must always have room for context beyond the overlap: with the question at its longest
    (max_question_len), RoBERTa's <s> q </s></s> ctx </s> leaves max_seq_len - max_question_len - 4 context
    tokens, BERT's [CLS] q [SEP] ctx [SEP] one more. Before the tokenizer is loaded, n_special = 3 (the
    fewest of any family) refuses only what no tokenizer could take; with it, the exact count."""
    budget = max_seq_len - max_question_len - n_special
    if budget <= doc_stride:
        raise TinyQAError(f"--max-seq-len {max_seq_len} leaves {budget} context tokens after a "
                          f"--max-question-len {max_question_len} question, not more than --doc-stride "
                          f"{doc_stride}: lower --doc-stride or --max-question-len, or raise --max-seq-len")
