"""Checks made at the entry, before any work: argparse range types, output paths, devices, window lengths.

Every command line and API call goes through these once, at its start, so that bad input costs a
second and one line (`error: --batch-size: must be a positive integer, got 0`), not an hour of work
followed by a traceback or, worse, a silently wrong result.
"""
import argparse
import math
import os

import torch

from .errors import TinyQAError


# --- argparse types: the parser refuses out-of-range values with its usual one-line `error:`

def _number(kind, test, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if not (isinstance(value, int) or math.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _number(int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32)")  # numpy's seed range
positive_float = _number(float, lambda v: v > 0, "a positive finite number")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
unit_float = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
learning_rate = _number(float, lambda v: 0 < v <= 1, "a learning rate in (0, 1]")  # AdamW's steps are about lr


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
    if os.path.exists(path) and not os.path.isdir(path):
        raise TinyQAError(f"{flag} {path}: exists and is not a directory")
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
            raise TinyQAError(f"{flag} {path}: no such file")
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

def check_featurizer(max_seq_len, doc_stride, max_query_length, n_special=3):
    """Windows must always have room for context beyond the overlap: with the question at its longest
    (max_query_length), RoBERTa's <s> q </s></s> ctx </s> leaves max_seq_len - max_query_length - 4 context
    tokens, BERT's [CLS] q [SEP] ctx [SEP] one more. Before the tokenizer is loaded, n_special = 3 (the
    fewest of any family) refuses only what no tokenizer could take; with it, the exact count."""
    budget = max_seq_len - max_query_length - n_special
    if budget <= doc_stride:
        raise TinyQAError(f"--max-seq-len {max_seq_len} leaves {budget} context tokens after a "
                          f"--max-query-length {max_query_length} question, not more than --doc-stride "
                          f"{doc_stride}: lower --doc-stride or --max-query-length, or raise --max-seq-len")
