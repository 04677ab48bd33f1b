"""MRQA reader and the verified download of the official splits."""
import gzip
import hashlib
import json

import pytest
from hubserver import Files

from tinyqa import TinyQAError
from tinyqa.catalog import SPLITS, download, split_files, split_sources
from tinyqa.examples import ReadReport
from tinyqa.mrqa import dataset_name, read_mrqa

CTX = "Paris is the capital of France."


def write_jsonl(path, rows, header=True, gz=True):
    lines = ([json.dumps({"header": {"dataset": "Toy", "split": "dev"}})] if header else []) + \
            [r if isinstance(r, str) else json.dumps(r) for r in rows]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def row(qid="q1", spans=((0, 4),), **over):
    r = {"context": CTX, "qas": [{"qid": qid, "question": "What is the capital?", "answers": ["Paris"],
                                  "detected_answers": [{"text": "Paris", "char_spans": [list(s) for s in spans],
                                                        "token_spans": [[0, 0]]}], "extra": 1}], "id": "x"}
    r.update(over)
    return r


def test_reads_header_gz_plain_and_inclusive_spans(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl.gz", [row("q1"), row("q2", spans=((24, 29),))])
    exs = list(read_mrqa(p))
    assert [e.qid for e in exs] == ["q1", "q2"] and all(e.dataset == "Toy" for e in exs)
    assert CTX[slice(*exs[0].span)] == "Paris" and CTX[slice(*exs[1].span)] == "France"  # inclusive -> exclusive
    assert exs[0].context is exs[1].context or exs[0].context == exs[1].context
    plain = write_jsonl(tmp_path / "NoHeader.jsonl", [row()], header=False, gz=False)
    assert dataset_name(plain) == "NoHeader" and [e.dataset for e in read_mrqa(plain)] == ["NoHeader"]


@pytest.mark.parametrize("bad,match", [
    ("{not json", r"b\.jsonl\.gz:3: not valid JSON"),
    (json.dumps({"qas": []}), r":3: missing field 'context'"),
    (json.dumps({"context": CTX, "qas": [{"qid": "z", "answers": []}]}), r":3: qas\[0\]: missing field 'question'"),
    (json.dumps(row("q9", spans=((20, 40),))), r":3: qas\[0\] \(qid q9\): detected_answers\[0\]\.char_spans\[0\].*outside"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, bad, match):
    p = write_jsonl(tmp_path / "b.jsonl.gz", [row("q1"), bad, row("q3")])
    with pytest.raises(TinyQAError, match=match):
        list(read_mrqa(p))
    report = ReadReport()
    got = [e.qid for e in read_mrqa(p, skip_bad=True, report=report)]
    assert got == ["q1", "q3"] and len(report.skipped) == 1 and ":3:" in report.skipped[0]


def test_truncated_gzip_is_a_clear_error(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl.gz", [row(f"q{i}") for i in range(200)])
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(TinyQAError, match=r"c\.jsonl\.gz:\d+: the file is cut or corrupt"):
        list(read_mrqa(p))


def test_squad_dev_reads_whole(squad_path):
    exs = list(read_mrqa(squad_path))
    assert len(exs) == 10570 and len({e.context for e in exs}) == 2067 and exs[0].dataset == "SQuAD"
    assert all(e.span is not None and e.answers for e in exs)


def test_download_verifies_md5_and_leaves_nothing_half_written(tmp_path):
    src = tmp_path / "src.jsonl.gz"
    write_jsonl(src, [row()])
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "Toy.jsonl.gz"
    assert download(src.as_uri(), md5, str(dest), progress=False) == str(dest) and dest.read_bytes() == src.read_bytes()
    dest.unlink()
    with pytest.raises(TinyQAError, match="is not the expected"):
        download(src.as_uri(), "0" * 32, str(dest), progress=False)
    assert [p.name for p in dest.parent.iterdir()] == ["Toy.jsonl.gz.lock"]  # no .part, no Toy.jsonl.gz
    with pytest.raises(TinyQAError, match=r"could not download http://127\.0\.0\.1:9/x.*--data FILE"):
        download("http://127.0.0.1:9/x", md5, str(dest), progress=False)
    assert [p.name for p in dest.parent.iterdir()] == ["Toy.jsonl.gz.lock"]


def test_split_files_uses_verified_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYQA_CACHE", str(tmp_path))
    src = write_jsonl(tmp_path / "src.jsonl.gz", [row()])
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    monkeypatch.setattr("tinyqa.catalog.SPLITS", {("dev", "Toy"): ("http://127.0.0.1:9/Toy.jsonl.gz", md5, 1)})
    with pytest.raises(TinyQAError, match="127.0.0.1:9.*--data FILE"):
        split_files("dev", progress=False)  # nothing cached yet, and the URL is unreachable
    with pytest.raises(TinyQAError, match="--train FILE"):  # the advice names the caller's own flag
        split_files("dev", progress=False, flag="--train")
    cached = tmp_path / "mrqa" / "dev" / "Toy.jsonl.gz"
    cached.parent.mkdir(parents=True, exist_ok=True)
    assert [p.name for p in cached.parent.iterdir()] == ["Toy.jsonl.gz.lock"]  # the failed download left no .part
    cached.write_bytes(src.read_bytes())
    assert split_files("dev", progress=False) == [str(cached)]  # verified copy: no network needed
    with pytest.raises(TinyQAError, match="unknown split"):
        split_files("validation")


def test_download_resumes_kept_bytes_and_the_md5_stays_the_gate(tmp_path):
    """Bytes an earlier run kept in .part: only the rest is asked for (Range); a server that ignores Range
    sends the whole file, which replaces them; kept bytes of another file fail the MD5 and the file is
    fetched once more from the start; a .part already whole gets 416 and passes the MD5."""
    files = Files()
    data = bytes(range(256)) * 12
    url, md5 = files.add("/f.jsonl.gz", data), hashlib.md5(data).hexdigest()
    dest, part = tmp_path / "f.jsonl.gz", tmp_path / "f.jsonl.gz.part"
    try:
        for kept, ranges, asked in [(data[:1000], True, [("bytes=1000-", 206)]),
                                    (data[:1000], False, [("bytes=1000-", 200)]),
                                    (bytes(1000), True, [("bytes=1000-", 206), (None, 200)]),
                                    (data, True, [(f"bytes={len(data)}-", 416)])]:
            part.write_bytes(kept)
            files.ranges, n = ranges, len(files.requests)
            assert download(url, md5, str(dest), progress=False) == str(dest)
            assert [r[2:] for r in files.requests[n:]] == asked
            assert dest.read_bytes() == data and not part.exists()
            dest.unlink()
    finally:
        files.close()


def test_split_sources_mirror_and_table(tmp_path, monkeypatch):
    """TINYQA_MRQA_MIRROR moves the release's files to another base URL with their MD5s (BioASQ stays behind
    its registration page); TINYQA_MRQA_SPLITS replaces the table; a bad table is one line naming it."""
    monkeypatch.delenv("TINYQA_MRQA_SPLITS", raising=False)
    monkeypatch.setenv("TINYQA_MRQA_MIRROR", "http://mirror.example/mrqa/")
    sources = split_sources()
    assert sources.keys() == SPLITS.keys()
    assert sources["dev", "SQuAD"] == ("http://mirror.example/mrqa/dev/SQuAD.jsonl.gz", SPLITS["dev", "SQuAD"][1])
    assert sources["test", "BioASQ"][0] == SPLITS["test", "BioASQ"][0]
    table = tmp_path / "splits.json"
    table.write_text(json.dumps({"dev": {"Toy": {"url": "file:///data/Toy.jsonl.gz", "md5": "0" * 32}}}))
    monkeypatch.setenv("TINYQA_MRQA_SPLITS", str(table))
    assert split_sources() == {("dev", "Toy"): ("file:///data/Toy.jsonl.gz", "0" * 32)}
    with pytest.raises(TinyQAError, match=r"TINYQA_MRQA_SPLITS=.*splits\.json lists no train files.*--train FILE"):
        split_files("train", flag="--train")
    md5 = "0" * 32
    entry = '{"url": "u", "md5": "%s"}' % md5
    for bad in ("{", "[1]", '{"dev": {"Toy": {"url": "u"}}}', '{"validation": {"Toy": %s}}' % entry,
                '{"dev": {"../Toy": %s}}' % entry, '{"dev": {"Toy": {"url": "u", "md5": "x"}}}'):
        table.write_text(bad)
        with pytest.raises(TinyQAError, match=r"^TINYQA_MRQA_SPLITS=\S*splits\.json: [^\n]*$"):
            split_sources()


def test_splits_table_is_the_release():
    assert sum(n for (s, _), (_, _, n) in SPLITS.items() if s == "train") == 516819
    assert sorted(d for s, d in SPLITS if s == "dev") == sorted(
        ["SQuAD", "NewsQA", "TriviaQA", "SearchQA", "HotpotQA", "NaturalQuestions"])
    assert len([1 for s, _ in SPLITS if s == "test"]) == 6
