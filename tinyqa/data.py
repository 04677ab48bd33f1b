"""QA files as Examples, whatever their format: one file, or several with their qids unique across all.

`read_examples` tells the two formats apart by their first bytes: SQuAD v1.1 / v2.0 JSON (what run_qa and
haystack users have; tinyqa/squad.py) begins `{"data":` or `{"version":`, MRQA JSONL (tinyqa/mrqa.py) with a
header or a context line. So every entry that takes MRQA files (evaluate.py --data, the training scripts'
--train and --eval-data) takes SQuAD files too.
"""
import os
from typing import Iterator, Optional

from .errors import TinyQAError, missing
from .examples import Example, QidIndex, ReadReport
from .mrqa import read_mrqa
from .squad import is_squad_json, read_squad


def read_examples(path, skip_bad=False, report: Optional[ReadReport] = None,
                  qids: Optional[QidIndex] = None) -> Iterator[Example]:
    """Stream the Examples of one MRQA or SQuAD file (see the readers for what each checks)."""
    path = str(path)
    if not os.path.exists(path):
        raise TinyQAError(f"{path}: {missing(path)}")
    reader = read_squad if is_squad_json(path) else read_mrqa
    return reader(path, skip_bad, report, qids)


def stream_files(paths, limit=None, skip_bad=False, report: Optional[ReadReport] = None,
                 flag="--data") -> Iterator[tuple]:
    """(index of the file in paths, Example) for the examples of several files, one after another and read
    lazily (memory does not grow with the files, but for one int per qid): at most `limit` questions of
    each, qids unique across all of them, and every file giving at least one question (an empty,
    header-only or all-skipped file is an error, so that it never enters an average as a silent 0)."""
    report = report if report is not None else ReadReport()
    qids = QidIndex()
    for i, path in enumerate(paths):
        n_skipped, n = len(report.skipped), 0
        for ex in read_examples(path, skip_bad, report, qids):
            if limit is not None and n >= limit:
                break
            n += 1
            yield i, ex
        if not n:
            why = f"all {len(report.skipped) - n_skipped} were skipped as malformed" \
                if len(report.skipped) > n_skipped else "it is empty or holds only a header"
            raise TinyQAError(f"{flag} {path}: no questions to use ({why})")


def read_files(paths, limit=None, skip_bad=False, report: Optional[ReadReport] = None, flag="--data") -> list:
    """[(path, dataset name, [Example])] of several files, each read whole, with stream_files' checks."""
    out = [(str(p), None, []) for p in paths]
    for i, ex in stream_files(paths, limit, skip_bad, report, flag):
        out[i][2].append(ex)
    return [(p, exs[0].dataset, exs) for p, _, exs in out]
