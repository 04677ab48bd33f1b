"""What the readers of QA files give and share: the Example, the report of what was skipped, the qid index.

Both readers (MRQA JSONL, tinyqa/mrqa.py; SQuAD JSON, tinyqa/squad.py) turn their format into Examples
whose `span` has an EXCLUSIVE end, so that nothing downstream has to remember which format said what.
Every problem they find is `file:place: what is wrong`: an error, or with skip_bad a line counted in the
ReadReport, so that nothing is dropped silently.
"""
import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .errors import TinyQAError


@dataclass
class Example:
    qid: str
    question: str
    context: str  # shared (not copied) by every question of the same context
    answers: list  # gold answer strings, for the metric; empty for an unanswerable SQuAD 2.0 question
    span: Optional[tuple] = None  # (start, end) with EXCLUSIVE end: the first gold answer's characters
    dataset: str = ""
    span_matches: bool = True  # False: the span's text is not its answer's, even after normalisation


@dataclass
class ReadReport:
    """What a read skipped (with skip_bad=True) and noticed, so that nothing is dropped silently."""
    skipped: list = field(default_factory=list)  # "file:line: reason" strings
    warnings: list = field(default_factory=list)  # "file:line: ..." kept, but worth a look

    def print(self, log):
        """One line per kind of problem with the count and the first few, so a long list stays readable."""
        if self.skipped:
            log(f"skipped {len(self.skipped)} malformed line(s) or question(s) (--skip-bad); first: "
                + " | ".join(self.skipped[:3]))
        if self.warnings:
            log(f"notice: {len(self.warnings)} detected answer(s) whose text is not the context at their "
                f"char_spans, even after the official normalisation (the span is used); first: "
                + " | ".join(self.warnings[:3]))


def report_bad(where, msg, skip_bad, report, advice="fix it, or pass --skip-bad to skip and count such lines"):
    """A malformed line or question: an error naming its place, or with skip_bad one more skipped in report."""
    if not skip_bad:
        raise TinyQAError(f"{where}: {msg} ({advice})")
    if report is not None:
        report.skipped.append(f"{where}: {msg}")


class QidIndex:
    """Where each qid was read (file, line), to name both places of a duplicate; an int per qid, not a string."""

    def __init__(self):
        self.paths, self.at = [], {}

    def where(self, qid):
        packed = self.at[qid]
        path, lineno = self.paths[packed >> 32], packed & 0xFFFFFFFF
        return f"{path}:{lineno}" if lineno else path

    def add(self, qid, path, lineno):
        """False (and nothing recorded) when qid was read before."""
        if qid in self.at:
            return False
        if not self.paths or self.paths[-1] != path:
            self.paths.append(path)
        self.at[qid] = ((len(self.paths) - 1) << 32) | lineno
        return True

    def duplicate(self, qid):
        return f"qid {qid} was already read at {self.where(qid)}: qids must be unique"


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def unicode_problem(text):
    """Why a str is not valid Unicode (None when it is): a lone surrogate such as "\\ud800", which a JSON
    escape can spell but no tokenizer, UTF-8 file or terminal can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode ({text[e.start]!r} at character {e.start}: a lone surrogate)"
    return None


def qid_problem(qid):
    """Why a question id cannot be used (None when it can): a non-empty string or an integer."""
    if isinstance(qid, str) and qid.strip():
        return unicode_problem(qid)
    if is_int(qid):
        return None
    return f"must be a non-empty string, not {json.dumps(qid)[:40]}"


def open_binary(path, what="a QA file"):
    """A gzip stream when the file starts with gzip's magic bytes (whatever its name), else the raw file."""
    if os.path.isdir(path):
        raise TinyQAError(f"{path}: is a directory, not {what}")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TinyQAError(f"{path}: cannot open ({e.strerror})")
    if f.read(2) == b"\x1f\x8b":
        f.seek(0)
        return gzip.GzipFile(fileobj=f, mode="rb")
    f.seek(0)
    return f


def file_stem(path) -> str:
    """The file's name without .gz, .jsonl or .json: the dataset name of a file that gives none."""
    name = os.path.basename(str(path))
    for ext in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(ext)
    return name
