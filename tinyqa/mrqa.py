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
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .errors import TinyQAError

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
    """What a read skipped with skip_bad=True, so that nothing is dropped silently."""
    skipped: list = field(default_factory=list)  # "file:line: reason" strings


def _fail(where, msg, skip_bad, report):
    if not skip_bad:
        raise TinyQAError(f"{where}: {msg} (fix the line, or pass --skip-bad to skip and count such lines)")
    report.skipped.append(f"{where}: {msg}")


def _open_text(path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gz else open(path, "rt", encoding="utf-8")


def _parse_line(row, where) -> list:
    """The examples of one context line; raises ValueError naming the field that is wrong."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    for key in ("context", "qas"):
        if key not in row:
            raise ValueError(f"missing field '{key}'")
    context, qas = row["context"], row["qas"]
    if not isinstance(context, str) or not isinstance(qas, list):
        raise ValueError("'context' must be a string and 'qas' a list")
    out = []
    for i, qa in enumerate(qas):
        for key in ("qid", "question", "answers"):
            if key not in qa:
                raise ValueError(f"qas[{i}]: missing field '{key}'")
        span = None
        for j, det in enumerate(qa.get("detected_answers") or []):
            for k, cs in enumerate(det.get("char_spans") or []):
                if not (isinstance(cs, (list, tuple)) and len(cs) == 2 and 0 <= cs[0] <= cs[1] < len(context)):
                    raise ValueError(f"qas[{i}] (qid {qa['qid']}): detected_answers[{j}].char_spans[{k}] = {cs} "
                                     f"lies outside the context (length {len(context)}; ends are inclusive)")
                if span is None:
                    span = (cs[0], cs[1] + 1)  # inclusive end -> exclusive end
        out.append(Example(str(qa["qid"]), qa["question"], context, list(qa["answers"]), span))
    return out


def dataset_name(path) -> str:
    """The dataset named by the file's header line, else the file name without its extensions."""
    with _open_text(path) as f:
        try:
            first = json.loads(f.readline() or "{}")
        except json.JSONDecodeError:
            first = {}
    if isinstance(first, dict) and isinstance(first.get("header"), dict) and first["header"].get("dataset"):
        return first["header"]["dataset"]
    name = os.path.basename(path)
    for ext in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(ext)
    return name


def read_mrqa(path, skip_bad=False, report: Optional[ReadReport] = None) -> Iterator[Example]:
    """Stream the examples of an MRQA .jsonl or .jsonl.gz file, one context line at a time."""
    path = str(path)
    if not os.path.exists(path):
        raise TinyQAError(f"{path}: no such file")
    report = report if report is not None else ReadReport()
    from .squad import is_squad_json, read_squad
    if is_squad_json(path):  # SQuAD v1.1 / v2.0 JSON, converted on the fly (tinyqa/squad.py)
        yield from read_squad(path, skip_bad, report)
        return
    name = dataset_name(path)
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    _fail(where, f"not valid JSON ({e.msg} at column {e.colno})", skip_bad, report)
                    continue
                if lineno == 1 and isinstance(row, dict) and "header" in row:
                    continue
                try:
                    examples = _parse_line(row, where)
                except ValueError as e:
                    _fail(where, str(e), skip_bad, report)
                    continue
                for ex in examples:
                    ex.dataset = name
                    yield ex
    except (OSError, EOFError, UnicodeDecodeError) as e:  # truncated gzip, not gzip/utf-8 at all, ...
        raise TinyQAError(f"{path}: cannot be read as MRQA JSONL ({type(e).__name__}: {e})")


# --- the official files

def cache_dir() -> str:
    return os.environ.get("TINYQA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinyqa")


def _md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, md5: str, dest: str, progress=True) -> str:
    """Fetch url to dest unless a verified copy is there; write to dest.part and rename only once the
    MD5 matches, so an interrupted or corrupted download never leaves a file that looks complete."""
    if os.path.exists(dest) and _md5(dest) == md5:
        return dest
    from tqdm import tqdm
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest), disable=not progress) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections are OSErrors
        if os.path.exists(part):
            os.remove(part)
        raise TinyQAError(f"could not download {url} ({e}); if you are offline, download it elsewhere and "
                          "pass it with --data FILE")
    got = _md5(part)
    if got != md5:
        os.remove(part)
        raise TinyQAError(f"{url}: MD5 {got} does not match the release's {md5}; the download is corrupt, try again")
    os.replace(part, dest)
    return dest


def split_files(split: str, datasets=None, progress=True) -> list:
    """Local paths of an official split ('train', 'dev' = in-domain dev, 'test' = out-of-domain dev)."""
    if split not in ("train", "dev", "test"):
        raise TinyQAError(f"unknown split {split!r}: use train, dev (in-domain dev) or test (out-of-domain dev)")
    paths = []
    for (s, name), (url, md5, _) in SPLITS.items():
        if s != split or (datasets and name not in datasets):
            continue
        dest = os.path.join(cache_dir(), "mrqa", split, f"{name}.jsonl.gz")
        if name in MANUAL:
            if not (os.path.exists(dest) and _md5(dest) == md5):
                raise TinyQAError(f"{name} is served from a registration page ({url}), not as a file: download "
                                  f"its MRQA dev file there and put it at {dest}, or pass it with --data FILE")
            paths.append(dest)
            continue
        paths.append(download(url, md5, dest, progress))
    return paths
