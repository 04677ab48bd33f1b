"""SQuAD-format JSON (v1.1 and v2.0: what run_qa and haystack users have), read as MRQA Examples.

Format (Rajpurkar et al. 2016, 2018; the official train/dev files):
    {"version": "v2.0", "data": [{"title": ..., "paragraphs": [{"context": ...,
        "qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}
`answer_start + len(text)` is an EXCLUSIVE end: context[answer_start : answer_start + len(text)] is the
answer. (MRQA's char_spans are inclusive, and mrqa.py converts them; both end up as Example.span, whose
end is exclusive.) The conversion follows MRQA's own conversion of SQuAD: the answers are the gold texts
(for the metric), the span is the first answer's. A v2.0 question with is_impossible (no answers) becomes
an Example with no answers and no span: evaluate.py scores it by SQuAD 2.0's rule with --handle-impossible-answer.

tinyqa/data.py hands any file that starts like a SQuAD JSON object here, so every entry that takes MRQA
files (evaluate.py --data, the training scripts' --train and --eval-data) takes SQuAD files too.
"""
import json
import re
import zlib
from typing import Iterator, Optional

from .errors import TinyQAError
from .files import JSON_ERRORS, json_problem
from .examples import (Example, QidIndex, ReadReport, file_stem, is_int, open_binary, qid_problem, report_bad,
                       unicode_problem)

_START = re.compile(rb'^\s*\{\s*"(data|version)"\s*:')


def is_squad_json(path) -> bool:
    """Whether the file (plain or gzipped) begins like a SQuAD JSON object ({"data": or {"version": first);
    MRQA JSONL lines begin with {"header": or a context line's fields."""
    try:
        with open_binary(path) as f:
            head = f.read(256)
    except (OSError, EOFError, TinyQAError):
        return False  # read_mrqa reports the unreadable file
    return bool(_START.match(head.removeprefix(b"\xef\xbb\xbf")))


def _load(path):
    try:
        with open_binary(path, "a SQuAD file") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except (OSError, EOFError, zlib.error) as e:
        raise TinyQAError(f"{path}: cannot be read as SQuAD JSON ({type(e).__name__}: {e})")
    except UnicodeDecodeError as e:
        raise TinyQAError(f"{path}: not UTF-8 (byte {e.start}); SQuAD files are UTF-8 JSON")
    except JSON_ERRORS as e:
        raise TinyQAError(f"{path}: {json_problem(e)}; a SQuAD file is one JSON object {{\"version\", \"data\"}}")


def read_squad(path, skip_bad=False, report: Optional[ReadReport] = None,
               qids: Optional[QidIndex] = None) -> Iterator[Example]:
    """Stream the Examples of a SQuAD v1.1 / v2.0 JSON file (loaded whole: it is one JSON object).
    A malformed question raises naming its place (data[i].paragraphs[j].qas[k], its id), or with
    skip_bad is skipped and recorded in report.skipped; a qid read before (in `qids`) is a duplicate."""
    path = str(path)
    doc = _load(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise TinyQAError(f"{path}: a SQuAD file needs a \"data\" list of articles")
    qids = qids if qids is not None else QidIndex()
    name = file_stem(path)
    for i, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            report_bad(f"{path}: data[{i}]", "needs a \"paragraphs\" list", skip_bad, report, ADVICE)
            continue
        for j, par in enumerate(paragraphs):
            where = f"{path}: data[{i}].paragraphs[{j}]"
            if not isinstance(par, dict) or not isinstance(par.get("context"), str) or not par["context"].strip() \
                    or not isinstance(par.get("qas"), list):
                report_bad(where, "needs a non-empty \"context\" string and a \"qas\" list", skip_bad, report, ADVICE)
                continue
            if unicode_problem(par["context"]):
                report_bad(where, f"\"context\" {unicode_problem(par['context'])}", skip_bad, report, ADVICE)
                continue
            context = par["context"]  # one str object shared by the paragraph's questions: tokenized once
            for k, qa in enumerate(par["qas"]):
                try:
                    ex = _example(qa, context)
                except ValueError as e:
                    report_bad(f"{where}.qas[{k}]", str(e), skip_bad, report, ADVICE)
                    continue
                if not qids.add(ex.qid, path, 0):  # one JSON object: no line to name
                    report_bad(path, qids.duplicate(ex.qid), skip_bad, report, ADVICE)
                    continue
                ex.dataset = name
                yield ex


ADVICE = "fix it, or pass --skip-bad to skip and count such questions"


def _example(qa, context):
    """The Example of one question, or ValueError saying which field is wrong: the checks the MRQA reader
    makes (a usable id, a non-empty question, non-empty answer texts at offsets inside the context), so
    that a SQuAD file can never train a label or score an answer that the MRQA form of it would refuse."""
    if not isinstance(qa, dict):
        raise ValueError("not a JSON object")
    for key in ("id", "question", "answers"):
        if key not in qa:
            raise ValueError(f"missing field '{key}'")
    qid = qa["id"]
    if qid_problem(qid):
        raise ValueError(f"'id' {qid_problem(qid)}")
    question, impossible = qa["question"], qa.get("is_impossible", False)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"(id {qid}) 'question' must be a non-empty string, not {json.dumps(question)[:40]}")
    if unicode_problem(question):
        raise ValueError(f"(id {qid}) 'question' {unicode_problem(question)}")
    if not isinstance(qa["answers"], list):
        raise ValueError(f"(id {qid}) 'answers' must be a list, not {json.dumps(qa['answers'])[:40]}")
    if not isinstance(impossible, bool):
        raise ValueError(f"(id {qid}) 'is_impossible' must be true or false, not {json.dumps(impossible)[:20]}")
    answers, span = [], None
    for n, a in enumerate(qa["answers"]):
        text, start = (a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (None, None)
        if not (isinstance(text, str) and text.strip() and is_int(start)):
            raise ValueError(f"(id {qid}) answers[{n}] needs a non-empty 'text' string and an 'answer_start' "
                             f"integer, not {json.dumps(a)[:60]}")
        if not 0 <= start <= len(context) - len(text) or context[start:start + len(text)] != text:
            raise ValueError(f"(id {qid}) answers[{n}] {text[:40]!r} is not at answer_start {start} of the "
                             f"context (length {len(context)})")
        answers.append(text)
        if span is None:
            span = (start, start + len(text))  # answer_start + len(text): already an exclusive end
    if impossible and answers:
        raise ValueError(f"(id {qid}) is_impossible but has answers")
    if not impossible and not answers:
        raise ValueError(f"(id {qid}) has no answers and is not marked is_impossible")
    return Example(str(qid), question, context, answers, span)
