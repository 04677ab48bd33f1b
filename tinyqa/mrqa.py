"""MRQA 2019 shared-task data: the JSONL(.gz) reader and the official splits with verified download.

Format (Fisch et al. 2019, "MRQA 2019 Shared Task"; github.com/mrqa/MRQA-Shared-Task-2019): an optional
first line `{"header": {"dataset": ..., "split": ...}}`, then one context per line:
    {"context": "...", "qas": [{"qid", "question", "answers": [...],
                                "detected_answers": [{"text", "char_spans": [[s, e]], "token_spans"}]}]}
`char_spans` ends are INCLUSIVE: context[s : e + 1] is the answer. We convert to Python's exclusive end
once, here, so that nothing downstream has to remember it.
"""
import gzip
import hashlib
import json
import os
import urllib.request
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .errors import TinyQAError
from .metrics import normalize_answer

_S3 = "https://s3.us-east-2.amazonaws.com/mrqa/release/v2"
# (split, dataset) -> (url, md5 of the .jsonl.gz, questions). From the MRQA 2019 release README.
SPLITS = {
    ("train", "SQuAD"): (f"{_S3}/train/SQuAD.jsonl.gz", "efd6a551d2697c20a694e933210489f8", 86588),
    ("train", "NewsQA"): (f"{_S3}/train/NewsQA.jsonl.gz", "182f4e977b849cb1dbfb796030b91444", 74160),
    ("train", "TriviaQA"): (f"{_S3}/train/TriviaQA-web.jsonl.gz", "e18f586152612a9358c22f5536bfd32a", 61688),
    ("train", "SearchQA"): (f"{_S3}/train/SearchQA.jsonl.gz", "612245315e6e7c4d8446e5fcc3dc1086", 117384),
    ("train", "HotpotQA"): (f"{_S3}/train/HotpotQA.jsonl.gz", "d212c7b3fc949bd0dc47d124e8c34907", 72928),
    ("train", "NaturalQuestions"): (f"{_S3}/train/NaturalQuestionsShort.jsonl.gz",
                                    "e27d27bf7c49eb5ead43cef3f41de6be", 104071),
    ("dev", "SQuAD"): (f"{_S3}/dev/SQuAD.jsonl.gz", "05f3f16c5c31ba8e46ff5fa80647ac46", 10507),
    ("dev", "NewsQA"): (f"{_S3}/dev/NewsQA.jsonl.gz", "5c188c92a84ddffe2ab590ac7598bde2", 4212),
    ("dev", "TriviaQA"): (f"{_S3}/dev/TriviaQA-web.jsonl.gz", "5c9fdc633dfe196f1b428c81205fd82f", 7785),
    ("dev", "SearchQA"): (f"{_S3}/dev/SearchQA.jsonl.gz", "9217ad3f6925c384702f2a4e6d520c38", 16980),
    ("dev", "HotpotQA"): (f"{_S3}/dev/HotpotQA.jsonl.gz", "125a96846c830381a8acff110ff6bd84", 5904),
    ("dev", "NaturalQuestions"): (f"{_S3}/dev/NaturalQuestionsShort.jsonl.gz",
                                  "c0347eebbca02d10d1b07b9a64efe61d", 12836),
    # out-of-domain dev: the model card's "Test"
    ("test", "BioASQ"): ("http://participants-area.bioasq.org/MRQA2019/", "70752a39beb826a022ab21353cb66e54", 1504),
    ("test", "DROP"): (f"{_S3}/dev/DROP.jsonl.gz", "070eb2ac92d2b2fc1b99abeda97ac37a", 1503),
    ("test", "DuoRC"): (f"{_S3}/dev/DuoRC.ParaphraseRC.jsonl.gz", "b325c0ad2fa10e699136561ee70c5ddd", 1501),
    ("test", "RACE"): (f"{_S3}/dev/RACE.jsonl.gz", "ba8063647955bbb3ba63e9b17d82e815", 674),
    ("test", "RelationExtraction"): (f"{_S3}/dev/RelationExtraction.jsonl.gz",
                                     "266be75954fcb31b9dbfa9be7a61f088", 2948),
    ("test", "TextbookQA"): (f"{_S3}/dev/TextbookQA.jsonl.gz", "8b52d21381d841f8985839ec41a6c7f7", 1503),
}
# BioASQ is served from a registration page, not as a file: it must be downloaded by hand.
MANUAL = {"BioASQ"}


@dataclass
class Example:
    qid: str
    question: str
    context: str  # shared (not copied) by every question of the same context line
    answers: list  # gold answer strings, for the metric
    span: Optional[tuple] = None  # (start, end) with EXCLUSIVE end: first char span of the first detected answer
    dataset: str = ""


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


class _BadLine(ValueError):
    """What is wrong with one line or one question of it; `question` is set when only that question is bad."""

    def __init__(self, msg, question=False):
        super().__init__(msg)
        self.question = question


def _fail(where, msg, skip_bad, report, advice="fix it, or pass --skip-bad to skip and count such lines"):
    if not skip_bad:
        raise TinyQAError(f"{where}: {msg} ({advice})")
    report.skipped.append(f"{where}: {msg}")


def _open_binary(path):
    """A gzip stream when the file starts with gzip's magic bytes (whatever its name), else the raw file."""
    if os.path.isdir(path):
        raise TinyQAError(f"{path}: is a directory, not an MRQA file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TinyQAError(f"{path}: cannot open ({e.strerror})")
    if f.read(2) == b"\x1f\x8b":
        f.seek(0)
        return gzip.GzipFile(fileobj=f, mode="rb")
    f.seek(0)
    return f


def _lines(path):
    """(line number, text) of every line. Each line is decoded on its own, so one bad byte costs one line;
    a UTF-8 byte-order mark on line 1 is dropped (as Python's utf-8-sig would); a gzip stream that is cut
    or corrupt raises _Cut with the line it happened at, after every line before it was given out."""
    with _open_binary(path) as f:
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


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _check_qa(qa, i, context):
    """(qid, question, answers, span or None, warnings) of one question; raises _BadLine naming the field."""
    if not isinstance(qa, dict):
        raise _BadLine(f"qas[{i}] is a {type(qa).__name__}, not an object", question=True)
    for key in ("qid", "question", "answers"):
        if key not in qa:
            raise _BadLine(f"qas[{i}]: missing field '{key}'", question=True)
    qid = qa["qid"]
    if not (isinstance(qid, str) and qid.strip()) and not _is_int(qid):
        raise _BadLine(f"qas[{i}]: 'qid' must be a non-empty string, not {json.dumps(qid)}", question=True)
    at = f"qas[{i}] (qid {qid})"
    question, answers = qa["question"], qa["answers"]
    if not isinstance(question, str) or not question.strip():
        raise _BadLine(f"{at}: 'question' must be a non-empty string, not {json.dumps(question)[:40]}", question=True)
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise _BadLine(f"{at}: 'answers' must be a list of strings, not {json.dumps(answers)[:60]}", question=True)
    if not answers or not any(a.strip() for a in answers):
        raise _BadLine(f"{at}: 'answers' is empty: the question cannot be scored", question=True)
    dets = qa.get("detected_answers") or []
    if not isinstance(dets, list):
        raise _BadLine(f"{at}: 'detected_answers' must be a list", question=True)
    span, warnings = None, []
    for j, det in enumerate(dets):
        if not isinstance(det, dict) or not isinstance(det.get("char_spans", []), list):
            raise _BadLine(f"{at}: detected_answers[{j}] must be an object with a 'char_spans' list", question=True)
        text = det.get("text")
        for k, cs in enumerate(det.get("char_spans") or []):
            if not (isinstance(cs, list) and len(cs) == 2 and all(_is_int(x) for x in cs)
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
            if isinstance(text, str) and found != text and normalize_answer(found) != normalize_answer(text):
                warnings.append(f"{at}: detected_answers[{j}].char_spans[{k}] gives {found[:40]!r}, its text "
                                f"is {text[:40]!r}")
            if span is None:
                span = (cs[0], cs[1] + 1)  # inclusive end -> exclusive end
    return str(qid), question, list(answers), span, warnings


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
                return str(first["header"]["dataset"])
            break
    except (_Cut, ValueError):
        pass  # the read proper reports what is wrong with the file
    name = os.path.basename(str(path))
    for ext in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(ext)
    return name


class QidIndex:
    """Where each qid was read (file, line), to name both places of a duplicate; an int per qid, not a string."""

    def __init__(self):
        self.paths, self.at = [], {}

    def where(self, qid):
        packed = self.at[qid]
        path, lineno = self.paths[packed >> 32], packed & 0xFFFFFFFF
        return f"{path}:{lineno}" if lineno else path

    def add(self, qid, path, lineno):
        if not self.paths or self.paths[-1] != path:
            self.paths.append(path)
        self.at[qid] = ((len(self.paths) - 1) << 32) | lineno


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
    from .squad import is_squad_json, read_squad
    if is_squad_json(path):  # SQuAD v1.1 / v2.0 JSON, converted on the fly (tinyqa/squad.py)
        for ex in read_squad(path, skip_bad, report):
            if ex.qid in qids.at:
                _fail(path, f"qid {ex.qid} was already read at {qids.where(ex.qid)}: qids must be unique",
                      skip_bad, report)
                continue
            qids.add(ex.qid, path, 0)  # a SQuAD file is one JSON object: no line to name
            yield ex
        return
    name = dataset_name(path)
    lineno = 0
    try:
        for lineno, text in _lines(path):
            where = f"{path}:{lineno}"
            if isinstance(text, UnicodeDecodeError):
                bad = text.object[text.start:text.start + 4]
                _fail(where, f"not UTF-8 (byte {bad[:1].hex()} at column {text.start + 1})", skip_bad, report)
                continue
            if not text or text.isspace():  # (not strip(): that copies every line)
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                _fail(where, f"not valid JSON ({e.msg} at column {e.colno})", skip_bad, report)
                continue
            if isinstance(row, dict) and "header" in row:
                if lineno != 1:
                    _fail(where, "a header line; only line 1 may be one", skip_bad, report)
                continue
            try:
                context, parsed = _parse_line(row)
            except _BadLine as e:
                _fail(where, str(e), skip_bad, report)
                continue
            for item in parsed:
                if isinstance(item, _BadLine):
                    _fail(where, str(item), skip_bad, report)
                    continue
                qid, question, answers, span, warnings = item
                if qid in qids.at:
                    _fail(where, f"qid {qid} was already read at {qids.where(qid)}: qids must be unique",
                          skip_bad, report)
                    continue
                qids.add(qid, path, lineno)
                report.warnings += [f"{where}: {w}" for w in warnings]
                yield Example(qid, question, context, answers, span, name)
    except _Cut as cut:
        _fail(f"{path}:{cut.lineno}", f"the file is cut or corrupt here ({type(cut.error).__name__}: {cut.error})",
              skip_bad, report, advice="download it again, or pass --skip-bad to use the lines before this one")


def stream_files(paths, limit=None, skip_bad=False, report: Optional[ReadReport] = None,
                 flag="--data") -> Iterator[tuple]:
    """(index of the file in paths, Example) for the examples of several MRQA files, one after another and
    read lazily (memory does not grow with the files, but for one int per qid): at most `limit` questions
    of each, qids unique across all of them, and every file giving at least one question (an empty,
    header-only or all-skipped file is an error, so that it never enters an average as a silent 0)."""
    report = report if report is not None else ReadReport()
    qids = QidIndex()
    for i, path in enumerate(paths):
        n_skipped, n = len(report.skipped), 0
        for ex in read_mrqa(path, skip_bad, report, qids):
            if limit is not None and n >= limit:
                break
            n += 1
            yield i, ex
        if not n:
            why = f"all {len(report.skipped) - n_skipped} were skipped as malformed" \
                if len(report.skipped) > n_skipped else "it is empty or holds only a header"
            raise TinyQAError(f"{flag} {path}: no questions to use ({why})")


def read_files(paths, limit=None, skip_bad=False, report: Optional[ReadReport] = None, flag="--data") -> list:
    """[(path, dataset name, [Example])] of several MRQA files, each read whole, with stream_files' checks."""
    out = [(str(p), None, []) for p in paths]
    for i, ex in stream_files(paths, limit, skip_bad, report, flag):
        out[i][2].append(ex)
    return [(p, exs[0].dataset, exs) for p, _, exs in out]


# --- the official files

def cache_dir() -> str:
    return os.environ.get("TINYQA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinyqa")


def _md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, md5: str, dest: str, progress=True, flag="--data") -> str:
    """Fetch url to dest unless a verified copy is there; write to dest.PID.part and rename only once the
    MD5 matches, so an interrupted or corrupted download never leaves a file that looks complete."""
    if os.path.exists(dest) and _md5(dest) == md5:
        return dest
    from tqdm import tqdm
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = f"{dest}.{os.getpid()}.part"  # per process: two runs downloading the same file do not mix bytes
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest), disable=not progress) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except BaseException as e:  # URLError, timeouts, refused connections (OSErrors), a full disk, Ctrl-C
        if os.path.exists(part):
            os.remove(part)
        if not isinstance(e, (OSError, ValueError)):
            raise
        raise TinyQAError(f"could not download {url} ({e}); if you are offline, download it elsewhere and "
                          f"pass it with {flag} FILE")
    got = _md5(part)
    if got != md5:
        os.remove(part)
        raise TinyQAError(f"{url}: MD5 {got} does not match the release's {md5}; the download is corrupt, try again")
    os.replace(part, dest)
    return dest


def split_files(split: str, datasets=None, progress=True, flag="--data") -> list:
    """Local paths of an official split ('train', 'dev' = in-domain dev, 'test' = out-of-domain dev); `flag`
    is the option that takes local files instead (evaluate.py's --data, the training scripts' --train)."""
    if split not in ("train", "dev", "test"):
        raise TinyQAError(f"unknown split {split!r}: use train, dev (in-domain dev) or test (out-of-domain dev)")
    paths = []
    for (s, name), (url, md5, _) in SPLITS.items():
        if s != split or (datasets and name not in datasets):
            continue
        dest = os.path.join(cache_dir(), "mrqa", split, f"{name}.jsonl.gz")
        if name in MANUAL:
            if not os.path.exists(dest):
                raise TinyQAError(f"{name} is served from a registration page ({url}), not as a file: download "
                                  f"its MRQA dev file there and put it at {dest}, or pass it with {flag} FILE")
            if _md5(dest) != md5:
                raise TinyQAError(f"{dest}: MD5 {_md5(dest)} is not the release's {md5}: this is not the MRQA "
                                  f"{name} dev file (or it is damaged); download it again from {url}")
            paths.append(dest)
            continue
        paths.append(download(url, md5, dest, progress, flag))
    return paths
