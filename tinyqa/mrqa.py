"""The MRQA 2019 shared task's JSONL(.gz) files read as Examples (the splits themselves: tinyqa/catalog.py).

Format (Fisch et al. 2019, "MRQA 2019 Shared Task"; github.com/mrqa/MRQA-Shared-Task-2019): an optional
first line `{"header": {"dataset": ..., "split": ...}}`, then one context per line:
    {"context": "...", "qas": [{"qid", "question", "answers": [...],
                                "detected_answers": [{"text", "char_spans": [[s, e]], "token_spans"}]}]}
`char_spans` ends are INCLUSIVE: context[s : e + 1] is the answer. We convert to Python's exclusive end
once, here, so that nothing downstream has to remember it.
"""
import json
import os
import zlib
from typing import Iterator, Optional

from .errors import TinyQAError
from .examples import (Example, QidIndex, ReadReport, file_stem, is_int, open_binary, qid_problem, report_bad,
                       unicode_problem)
from .files import JSON_ERRORS, json_problem
from .metrics import normalize_answer


class _BadLine(ValueError):
    """What is wrong with one line or one question of it; `question` is set when only that question is bad."""

    def __init__(self, msg, question=False):
        super().__init__(msg)
        self.question = question


def _lines(path):
    """(line number, text) of every line. Each line is decoded on its own, so one bad byte costs one line;
    a UTF-8 byte-order mark on line 1 is dropped (as Python's utf-8-sig would); a gzip stream that is cut
    or corrupt raises _Cut with the line it happened at, after every line before it was given out."""
    with open_binary(path, "an MRQA file") as f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except (EOFError, OSError, zlib.error) as e:  # truncated, or bad deflate data / CRC
                raise _Cut(lineno + 1, e)
            if not raw:
                return
            lineno += 1
            if lineno == 1:
                if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise TinyQAError(f"{path}: is UTF-16; MRQA files are UTF-8 (convert it, e.g. with iconv)")
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, e


class _Cut(Exception):
    def __init__(self, lineno, error):
        self.lineno, self.error = lineno, error


def _check_qa(qa, i, context):
    """(qid, question, answers, span or None, warnings, whether the span's text matches) of one question;
    raises _BadLine naming the field."""
    if not isinstance(qa, dict):
        raise _BadLine(f"qas[{i}] is a {type(qa).__name__}, not an object", question=True)
    for key in ("qid", "question", "answers"):
        if key not in qa:
            raise _BadLine(f"qas[{i}]: missing field '{key}'", question=True)
    qid = qa["qid"]
    if qid_problem(qid):
        raise _BadLine(f"qas[{i}]: 'qid' {qid_problem(qid)}", question=True)
    at = f"qas[{i}] (qid {qid})"
    question, answers = qa["question"], qa["answers"]
    if not isinstance(question, str) or not question.strip():
        raise _BadLine(f"{at}: 'question' must be a non-empty string, not {json.dumps(question)[:40]}", question=True)
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise _BadLine(f"{at}: 'answers' must be a list of strings, not {json.dumps(answers)[:60]}", question=True)
    if not answers or not any(a.strip() for a in answers):
        raise _BadLine(f"{at}: 'answers' is empty: the question cannot be scored", question=True)
    for name, text in (("question", question), *((f"answers[{n}]", a) for n, a in enumerate(answers))):
        if unicode_problem(text):
            raise _BadLine(f"{at}: '{name}' {unicode_problem(text)}", question=True)
    dets = qa.get("detected_answers") or []
    if not isinstance(dets, list):
        raise _BadLine(f"{at}: 'detected_answers' must be a list", question=True)
    span, span_matches, warnings = None, True, []
    for j, det in enumerate(dets):
        if not isinstance(det, dict) or not isinstance(det.get("char_spans", []), list):
            raise _BadLine(f"{at}: detected_answers[{j}] must be an object with a 'char_spans' list", question=True)
        text = det.get("text")
        for k, cs in enumerate(det.get("char_spans") or []):
            if not (isinstance(cs, list) and len(cs) == 2 and all(is_int(x) for x in cs)
                    and 0 <= cs[0] <= cs[1] < len(context)):
                raise _BadLine(f"{at}: detected_answers[{j}].char_spans[{k}] = {json.dumps(cs)[:40]} is not an "
                               f"[start, end] pair of ints, or lies outside the context (length {len(context)}; "
                               "ends are inclusive)",
                               question=True)
            # The MRQA release found spans by matching normalised tokens, so a span's text can differ from
            # detected_answers.text in case, punctuation and articles ("The Beatles" vs "beatles"). Those
            # are expected; compared after the official metric's normalisation, any other difference means
            # the offsets point at the wrong text (e.g. computed on another version of the context).
            found = context[cs[0]:cs[1] + 1]
            matches = not isinstance(text, str) or found == text or normalize_answer(found) == normalize_answer(text)
            if not matches:
                warnings.append(f"{at}: detected_answers[{j}].char_spans[{k}] gives {found[:40]!r}, its text "
                                f"is {text[:40]!r}")
            if span is None:
                span, span_matches = (cs[0], cs[1] + 1), matches  # inclusive end -> exclusive end
    return str(qid), question, list(answers), span, warnings, span is None or span_matches


def _parse_line(row):
    """[(question index, (qid, question, answers, span, warnings) or _BadLine)] of one context line, and its
    context; raises _BadLine when the line as a whole is wrong."""
    if not isinstance(row, dict):
        raise _BadLine(f"a JSON {type(row).__name__}, not an object with 'context' and 'qas'")
    for key in ("context", "qas"):
        if key not in row:
            raise _BadLine(f"missing field '{key}'")
    context, qas = row["context"], row["qas"]
    if not isinstance(context, str) or not context.strip():
        raise _BadLine(f"'context' must be a non-empty string, not {json.dumps(context)[:40]}")
    if unicode_problem(context):
        raise _BadLine(f"'context' {unicode_problem(context)}")
    if not isinstance(qas, list):
        raise _BadLine(f"'qas' must be a list, not {json.dumps(qas)[:40]}")
    out = []
    for i, qa in enumerate(qas):
        try:
            out.append(_check_qa(qa, i, context))
        except _BadLine as e:
            out.append(e)
    return context, out


def dataset_name(path) -> str:
    """The dataset named by the file's header line, else the file name without its extensions."""
    try:
        for _, text in _lines(str(path)):
            first = json.loads(text) if isinstance(text, str) else None
            if isinstance(first, dict) and isinstance(first.get("header"), dict) and first["header"].get("dataset"):
                # (a lone surrogate, which no terminal or UTF-8 file holds, is shown as its \u escape)
                return str(first["header"]["dataset"]).encode("utf-8", "backslashreplace").decode("utf-8")
            break
    except (_Cut, *JSON_ERRORS):
        pass  # the read proper reports what is wrong with the file
    return file_stem(path)


def read_mrqa(path, skip_bad=False, report: Optional[ReadReport] = None,
              qids: Optional[QidIndex] = None) -> Iterator[Example]:
    """Stream the examples of an MRQA .jsonl or .jsonl.gz file, one context line at a time.

    Every problem is reported as `file:line: what is wrong`: an error, or with skip_bad a skipped line
    (or question) counted in `report`. A qid seen before in this file, or in earlier files read with the
    same `qids` index, is a duplicate named with both places."""
    path = str(path)
    if not os.path.exists(path):
        raise TinyQAError(f"{path}: no such file")
    report = report if report is not None else ReadReport()
    qids = qids if qids is not None else QidIndex()
    name = dataset_name(path)
    lineno = 0
    try:
        for lineno, text in _lines(path):
            where = f"{path}:{lineno}"
            if isinstance(text, UnicodeDecodeError):
                bad = text.object[text.start:text.start + 4]
                report_bad(where, f"not UTF-8 (byte {bad[:1].hex()} at column {text.start + 1})", skip_bad, report)
                continue
            if not text or text.isspace():  # (not strip(): that copies every line)
                continue
            try:
                row = json.loads(text)
            except JSON_ERRORS as e:
                report_bad(where, json_problem(e), skip_bad, report)
                continue
            if isinstance(row, dict) and "header" in row:
                if lineno != 1:
                    report_bad(where, "a header line; only line 1 may be one", skip_bad, report)
                continue
            try:
                context, parsed = _parse_line(row)
            except _BadLine as e:
                report_bad(where, str(e), skip_bad, report)
                continue
            for item in parsed:
                if isinstance(item, _BadLine):
                    report_bad(where, str(item), skip_bad, report)
                    continue
                qid, question, answers, span, warnings, span_matches = item
                if not qids.add(qid, path, lineno):
                    report_bad(where, qids.duplicate(qid), skip_bad, report)
                    continue
                report.warnings += [f"{where}: {w}" for w in warnings]
                yield Example(qid, question, context, answers, span, name, span_matches)
    except _Cut as cut:
        report_bad(f"{path}:{cut.lineno}", f"the file is cut or corrupt here ({type(cut.error).__name__}: {cut.error})",
                   skip_bad, report, advice="download it again, or pass --skip-bad to use the lines before this one")
