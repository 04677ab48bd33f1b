"""The bad-input corpus of the surfaces beside the training scripts: the HTTP server, the answer CLI's input,
SQuAD JSON, ONNX export, the feature store and teacher cache, model files, and the Python API's options.

For each case the surface must answer with a one-line error that names the input (exit code 2 for a
command, a JSON {"error"} with a 4xx status for the server, a TinyQAError for the API), or with the right
behaviour (a bad line skipped and reported, the good ones answered); never a traceback, a 500, another
exception or a silently wrong result. tests/test_bad_input.py holds the training and evaluation cases.
"""
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ROOT
from hermetic import tiny_checkpoint
from safetensors.torch import load_file, save_file

from tinyqa import QuestionAnswerer, TinyQAError, load_model
from tinyqa.data import read_examples
from tinyqa.decode import DecodeConfig
from tinyqa.features import FeaturizerConfig
from tinyqa.server import make_server
from tinyqa.synthetic import make_dataset, train_tokenizer, write_mrqa
from tinyqa.tokenizer import save_tokenizer
from tinyqa.weights import load_model_config

TIMEOUT = 60
CTX = "Ada Berg was born in Oslo in 1901."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("surfaces") / "model"
    tiny_checkpoint(d)
    return d


@pytest.fixture(scope="module")
def qa(ckpt):
    return QuestionAnswerer.from_pretrained(str(ckpt))


@pytest.fixture(scope="module")
def port(qa):
    srv = make_server(qa, "127.0.0.1", 0, max_body_bytes=20_000, model_name="tiny", quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


# --- the HTTP server: every client input is answered, with JSON, and never with a 500

def raw(port, data: bytes, read=True):
    """(status, headers, body bytes) of a raw request written to a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        if not read:
            return None
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def post_raw(port, body: bytes, extra=b""):
    return raw(port, b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + str(len(body)).encode()
               + b"\r\n" + extra + b"\r\n" + body)


def good(**over):
    return {"question": "Where was Ada Berg born?", "context": CTX, **over}


DEEP = "[" * 5_000 + "]" * 5_000
BODIES = {
    "huge-integer-option": b'{"question": "Who?", "context": "Ada.", "top_k": 1' + b"0" * 5000 + b"}",
    "deep-nesting": ('{"question": "Who?", "context": "Ada.", "inputs": ' + DEEP + "}").encode(),
    "deep-nesting-whole-body": DEEP.encode(),
    "lone-surrogate-question": b'{"question": "Who \\ud800?", "context": "Ada wrote it."}',
    "lone-surrogate-context": b'{"question": "Who?", "context": "Ada \\udfff wrote it."}',
    "lone-surrogate-in-inputs": b'{"inputs": [{"question": "\\ud83d", "context": "Ada."}]}',
    "not-utf8": b'{"question": "Who?", "context": "Ada \xff wrote it."}',
    "empty-body": b"",
    "not-json": b"question=Who&context=Ada",
    "json-array": b'["Who?", "Ada."]',
    "json-null": b"null",
    "unknown-field": json.dumps(good(temperature=2)).encode(),
    "question-number": json.dumps(good(question=3)).encode(),
    "question-empty": json.dumps(good(question="  ")).encode(),
    "context-null": json.dumps(good(context=None)).encode(),
    "top-k-string": json.dumps(good(top_k="3")).encode(),
    "top-k-float": json.dumps(good(top_k=1.5)).encode(),
    "top-k-bool": json.dumps(good(top_k=True)).encode(),
    "top-k-zero": json.dumps(good(top_k=0)).encode(),
    "top-k-infinite": b'{"question": "Who?", "context": "Ada.", "top_k": 1e999}',
    "doc-stride-negative": json.dumps(good(doc_stride=-1)).encode(),
    "max-seq-len-too-long": json.dumps(good(max_seq_len=100_000)).encode(),
    "align-to-words-string": json.dumps(good(align_to_words="yes")).encode(),
    "inputs-not-list": b'{"inputs": {"question": "Who?", "context": "Ada."}}',
    "inputs-item-string": b'{"inputs": ["Who?"]}',
    "inputs-and-question": json.dumps({"inputs": [good()], "question": "Who?"}).encode(),
    "inputs-empty": b'{"inputs": []}',
    "questions-and-contexts-differ": json.dumps({"question": ["a?", "b?"], "context": ["x"]}).encode(),
    "one-question-many-contexts": json.dumps({"question": "a?", "context": ["x", "y"]}).encode(),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_server_bad_body_is_a_json_400(port, name):
    status, headers, body = post_raw(port, BODIES[name])
    assert status == 400 and headers["Content-Type"] == "application/json", (status, body[:200])
    assert "\n" not in json.loads(body)["error"]


@pytest.mark.parametrize("length,status", [("-1", 400), ("abc", 400), ("\u00b2", 400), ("\u0663", 400), ("1e3", 400),
                                           ("0x10", 400), ("+5", 400), ("9" * 40, 400), ("30000", 413), (None, 411)])
def test_server_odd_content_length(port, length, status):
    header = b"" if length is None else b"Content-Length: " + length.encode() + b"\r\n"
    got, headers, body = raw(port, b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\n" + b"{}")
    assert got == status and "error" in json.loads(body), (got, body[:200])


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "HEAD", "FROB"])
def test_server_other_methods_get_json(port, method):
    status, headers, body = raw(port, f"{method} /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode())
    assert status in (405, 501), status
    if method != "HEAD":  # a HEAD answer has no body, by HTTP's rules
        assert headers["Content-Type"] == "application/json" and "error" in json.loads(body)


@pytest.mark.parametrize("request_line", [b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                                          b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"])
def test_server_malformed_requests_get_json(port, request_line):
    status, headers, body = raw(port, request_line)
    assert 400 <= status < 500 or status == 505, status
    assert headers.get("Content-Type") == "application/json" and "error" in json.loads(body)


def test_server_client_hanging_up_mid_body_costs_nothing(port):
    """A client that sends half its body and leaves: no traceback, and the server answers the next one."""
    raw(port, b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n{\"question\": ", read=False)
    status, _, body = post_raw(port, json.dumps(good()).encode())
    assert status == 200 and json.loads(body)["answers"][0][0]["text"]


# --- the answer CLI: one bad line is reported with its number and skipped, the others are answered

def answer_cli(ckpt, stdin: bytes, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tinyqa", "answer", "--model", str(ckpt), *args], input=stdin,
                          capture_output=True, timeout=300, env=env, cwd=ROOT)


BAD_LINES = {
    "deep-nesting": (DEEP.encode(), "nested too deeply"),
    "lone-surrogate": (b'{"question": "Who \\ud800?", "context": "Ada."}', "lone surrogate"),
    "binary-bytes": (b"\x00\xff\xfe\x80 binary", "not UTF-8"),
    "latin-1": ("{\"question\": \"Où?\", \"context\": \"Orléans\"}".encode("latin-1"), "not UTF-8"),
    "huge-integer": (b'{"question": "Who?", "context": "Ada.", "n": 1' + b"0" * 5000 + b"}", "not usable JSON"),
    "field-text": (json.dumps(good(text="mine")).encode(), "field 'text'"),
    "field-score": (json.dumps(good(score=1)).encode(), "field 'score'"),
    "field-start": (json.dumps(good(start=0)).encode(), "field 'start'"),
    "field-end": (json.dumps(good(end=1)).encode(), "field 'end'"),
    "field-logit-score": (json.dumps(good(logit_score=1)).encode(), "field 'logit_score'"),
    "field-answers": (json.dumps(good(answers=["x"])).encode(), "field 'answers'"),
    "question-list": (json.dumps(good(question=["a"])).encode(), "question must be a string"),
}


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_answer_cli_bad_line_is_skipped_and_the_rest_answered(ckpt, name):
    line, says = BAD_LINES[name]
    first, last = json.dumps(good(id=1)).encode(), json.dumps(good(id=3)).encode()
    r = answer_cli(ckpt, first + b"\n" + line + b"\n" + last + b"\n")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode()[-500:]
    assert [json.loads(x)["id"] for x in r.stdout.splitlines()] == [1, 3]
    assert b"stdin:2: " in r.stderr and says.encode() in r.stderr, r.stderr


def test_answer_cli_passes_non_finite_numbers_through_as_null(ckpt):
    r = answer_cli(ckpt, b'{"question": "Where was Ada Berg born?", "context": "Ada Berg was born in Oslo.", "x": NaN}\n')
    assert r.returncode == 0 and json.loads(r.stdout)["x"] is None


def test_answer_cli_into_a_closed_pipe_ends_quietly(ckpt):
    """`| head -1`: the reader leaves after one line; the CLI stops without an error message, exit 0."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    lines = b"".join(json.dumps(good(id=i)).encode() + b"\n" for i in range(400))
    cmd = f"{sys.executable} -m tinyqa answer --model {ckpt} --chunk-size 1 | head -1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], input=lines, capture_output=True, timeout=300,
                       env=env, cwd=ROOT)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 and not r.stderr, r.stderr


def test_answer_cli_questions_file_with_binary_line(ckpt, tmp_path):
    (tmp_path / "q.txt").write_bytes(b"Where was Ada Berg born?\n\xff\xfe\n  \nWho was born in Oslo?\n")
    r = answer_cli(ckpt, b"", "--questions", str(tmp_path / "q.txt"), "--context", CTX)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
    assert b"q.txt:2: not UTF-8" in r.stderr and b"q.txt:3: the question is empty" in r.stderr


@pytest.mark.parametrize("args,says", [
    (["--question", "Who\udcff?", "--context", CTX], "lone surrogate"),
    (["--question", "Who?", "--context", "@{tmp}/latin1.txt"], "not UTF-8"),
])
def test_answer_cli_bad_arguments_are_one_line(ckpt, tmp_path, args, says):
    (tmp_path / "latin1.txt").write_bytes("Orléans".encode("latin-1"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    argv = [os.fsencode(a) if "\udcff" not in a else a.encode("utf-8", "surrogateescape") for a in args]
    r = subprocess.run([sys.executable.encode(), b"-m", b"tinyqa", b"answer", b"--model", os.fsencode(str(ckpt)), *argv],
                       capture_output=True, timeout=300, env=env, cwd=ROOT)
    err = r.stderr.decode(errors="replace").strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


# --- SQuAD JSON: what the MRQA reader refuses, refused here too, naming the place

def squad_doc(qa_over=None, par_over=None, answers=None):
    qa = {"id": "q1", "question": "Where was Ada Berg born?",
          "answers": answers if answers is not None else [{"text": "Oslo", "answer_start": 21}]}
    qa.update(qa_over or {})
    par = {"context": CTX, "qas": [qa]}
    par.update(par_over or {})
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [par]}]}


SQUAD_BAD = {
    "start-negative": (squad_doc(answers=[{"text": "Oslo", "answer_start": -13}]), "answer_start -13"),
    "start-bool": (squad_doc(answers=[{"text": "d", "answer_start": True}]), "answer_start"),
    "start-float": (squad_doc(answers=[{"text": "Oslo", "answer_start": 21.0}]), "answer_start"),
    "start-string": (squad_doc(answers=[{"text": "Oslo", "answer_start": "21"}]), "answer_start"),
    "start-past-context": (squad_doc(answers=[{"text": "x", "answer_start": 99}]), "not at answer_start 99"),
    "text-elsewhere": (squad_doc(answers=[{"text": "Oslo", "answer_start": 0}]), "not at answer_start 0"),
    "text-empty": (squad_doc(answers=[{"text": "", "answer_start": 3}]), "non-empty 'text'"),
    "text-spaces": (squad_doc(answers=[{"text": " ", "answer_start": 3}]), "non-empty 'text'"),
    "text-number": (squad_doc(answers=[{"text": 5, "answer_start": 3}]), "non-empty 'text'"),
    "answer-string": (squad_doc(answers=["Oslo"]), "answers[0]"),
    "answers-dict": (squad_doc({"answers": {"text": "Oslo"}}), "'answers' must be a list"),
    "id-null": (squad_doc({"id": None}), "'id' must be"),
    "id-empty": (squad_doc({"id": " "}), "'id' must be"),
    "id-object": (squad_doc({"id": {"a": 1}}), "'id' must be"),
    "id-list": (squad_doc({"id": [1]}), "'id' must be"),
    "id-bool": (squad_doc({"id": True}), "'id' must be"),
    "question-empty": (squad_doc({"question": ""}), "'question' must be a non-empty string"),
    "question-null": (squad_doc({"question": None}), "'question' must be a non-empty string"),
    "impossible-string": (squad_doc({"is_impossible": "false"}), "'is_impossible' must be true or false"),
    "impossible-with-answers": (squad_doc({"is_impossible": True}), "is_impossible but has answers"),
    "no-answers-not-impossible": (squad_doc(answers=[]), "has no answers"),
    "context-empty": (squad_doc(par_over={"context": "  "}), "non-empty \"context\""),
    "context-number": (squad_doc(par_over={"context": 7}), "non-empty \"context\""),
    "qas-dict": (squad_doc(par_over={"qas": {}}), "\"qas\" list"),
    "missing-id": ({"version": "1.1", "data": [{"paragraphs": [{"context": CTX, "qas": [{"question": "q?",
                                                                                         "answers": []}]}]}]}, "'id'"),
    "duplicate-id": ({"version": "1.1", "data": [{"paragraphs": [{"context": CTX, "qas": [
        {"id": "a", "question": "q?", "answers": [{"text": "Oslo", "answer_start": 21}]}] * 2}]}]}, "already read"),
}


@pytest.mark.parametrize("name", list(SQUAD_BAD))
def test_squad_reader_refuses_what_mrqa_refuses(tmp_path, name):
    doc, says = SQUAD_BAD[name]
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(TinyQAError) as e:
        list(read_examples(p))
    assert says in str(e.value) and "\n" not in str(e.value) and "dev.json" in str(e.value), str(e.value)


@pytest.mark.parametrize("content,says", [
    ('{"version": "1.1", "data": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"version": "1.1", "data": [], "n": 1' + "0" * 5000 + "}", "not usable JSON"),
    ('{"version": "1.1", "data": [', "not valid JSON"),
    ('{"version": "1.1", "data": {}}', "\"data\" list"),
])
def test_squad_file_level_problems(tmp_path, content, says):
    p = tmp_path / "dev.json"
    p.write_text(content)
    with pytest.raises(TinyQAError, match=says):
        list(read_examples(p))


def test_squad_gzip_cut_is_an_error(tmp_path):
    data = gzip.compress(json.dumps(squad_doc()).encode())
    (tmp_path / "dev.json.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TinyQAError, match="dev.json.gz"):
        list(read_examples(tmp_path / "dev.json.gz"))


def test_all_unanswerable_file_without_the_flag_is_an_error(ckpt, tmp_path):
    doc = squad_doc({"is_impossible": True}, answers=[])
    (tmp_path / "v2.json").write_text(json.dumps(doc))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(ckpt), "--data",
                        str(tmp_path / "v2.json"), "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "all 1 questions are unanswerable" in r.stderr and "--handle-impossible-answer" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(ckpt), "--data",
                        str(tmp_path / "v2.json"), "--quiet", "--handle-impossible-answer"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr


# --- export: what would fail later in the runtime fails now, with what to do

def export(*argv):
    from tinyqa.__main__ import main
    main(["export", *map(str, argv)])


def test_export_without_onnx_says_what_to_install(ckpt, tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        export("--model", ckpt, "--onnx", tmp_path / "out")
    assert e.value.code == 2 and "pip install onnx" in capsys.readouterr().err


@pytest.mark.parametrize("opset", ["13", "7", "99"])
def test_export_opset_it_cannot_write(ckpt, tmp_path, capsys, opset):
    with pytest.raises(SystemExit) as e:
        export("--model", ckpt, "--onnx", tmp_path / "out", "--opset", opset)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"--opset {opset}" in err[0]


def test_export_into_a_folder_that_holds_another_model(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "vocab.txt").write_text("[PAD]\n")  # another model's tokenizer file
    with pytest.raises(SystemExit):
        export("--model", ckpt, "--onnx", out)
    assert "not empty" in capsys.readouterr().err and (out / "vocab.txt").exists()
    export("--model", ckpt, "--onnx", out, "--overwrite")  # an earlier export's files: replaced, not mixed
    assert not (out / "vocab.txt").exists() and (out / "model.onnx").exists()
    (out / "notes.md").write_text("mine")
    with pytest.raises(SystemExit):
        export("--model", ckpt, "--onnx", out, "--overwrite")
    assert "notes.md" in capsys.readouterr().err and (out / "notes.md").exists()


def test_export_checkpoint_without_tokenizer_or_with_a_bigger_one(ckpt, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / name, bare / name)
    with pytest.raises(SystemExit):
        export("--model", bare, "--onnx", tmp_path / "o1")
    assert "needs the checkpoint's tokenizer" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    big = tmp_path / "big"
    shutil.copytree(bare, big)
    save_tokenizer(train_tokenizer([f"word{i} other{i * 7} more{i * 13}" for i in range(3000)], 2000), big)
    with pytest.raises(SystemExit):
        export("--model", big, "--onnx", tmp_path / "o2")
    assert "not this model's tokenizer" in capsys.readouterr().err


# --- the feature store and the teacher cache: verified when read, never trusted

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Training files, a tokenizer, a tiny config and a teacher, for store and cache cases."""
    w = tmp_path_factory.mktemp("cache-world")
    rows = make_dataset(12, seed=5)
    write_mrqa(w / "train.jsonl.gz", rows)
    tok = train_tokenizer([r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]], 400)
    save_tokenizer(tok, w / "tok")
    cfg = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=130, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    (w / "cfg.json").write_text(json.dumps(cfg))
    from tinyqa import EncoderConfig, EncoderForQA, save_pretrained
    torch.manual_seed(0)
    save_pretrained(EncoderForQA(EncoderConfig(**cfg)), w / "teacher", tokenizer=tok)
    return w


def distill(w, out, *extra):
    from tinyqa import cli
    from tinyqa.train import train
    return train(cli.distill_args(["--train", str(w / "train.jsonl.gz"), "--tokenizer", str(w / "tok"), "--init-config",
                                   str(w / "cfg.json"), "--teacher", str(w / "teacher"), "--max-seq-len", "128",
                                   "--doc-stride", "32", "--epochs", "1", "--batch-size", "8", "--save-every", "0",
                                   "--quiet", "--out", str(out), "--feature-store", str(w / "fs"),
                                   "--teacher-cache", str(w / "tc"), "--overwrite", *extra]))


def only(folder):
    [name] = [n for n in os.listdir(folder) if not n.endswith(".lock")]
    return folder / name


def flip_byte(path, at=-3):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where,file,damage", [
    ("fs", "ids.bin", "flip"), ("fs", "offsets.npy", "flip"), ("fs", "windows.npy", "truncate"),
    ("tc", "logits.npy", "flip"), ("tc", "logits.npy", "zero"), ("tc", "offsets.npy", "truncate"),
])
def test_a_damaged_cache_is_refused_naming_it(small_run, tmp_path, where, file, damage):
    w = small_run
    distill(w, tmp_path / "first")
    path = only(w / where) / file
    kept = path.read_bytes()
    try:
        if damage == "flip":
            flip_byte(path)
        elif damage == "zero":
            path.write_bytes(bytes(len(kept)))
        else:
            path.write_bytes(kept[: len(kept) // 2])
        with pytest.raises(TinyQAError) as e:
            distill(w, tmp_path / "second")
        assert str(only(w / where)) in str(e.value) and "damaged" in str(e.value) and "delete the folder" in str(e.value)
    finally:
        path.write_bytes(kept)


@pytest.mark.parametrize("where", ["fs", "tc"])
def test_a_cache_folder_without_its_key_file_is_rebuilt(small_run, tmp_path, where):
    """A folder that lost key.json (never completed, or a hand deletion) is rebuilt, not a lasting error."""
    w = small_run
    distill(w, tmp_path / "first")
    (only(w / where) / "key.json").unlink()
    distill(w, tmp_path / "second")
    assert (only(w / where) / "key.json").exists()


def test_store_ids_beyond_the_models_vocabulary_are_refused(small_run, tmp_path):
    w = small_run
    distill(w, tmp_path / "first")
    key = only(w / "fs") / "key.json"
    kept = key.read_text()
    info = json.loads(kept)
    key.write_text(json.dumps(dict(info, max_id=10 ** 6)))
    try:
        with pytest.raises(TinyQAError, match="token id 1000000"):
            distill(w, tmp_path / "second")
    finally:
        key.write_text(kept)


def test_a_teacher_giving_nan_is_named(small_run, tmp_path):
    w = small_run
    shutil.copytree(w / "teacher", tmp_path / "nan-teacher")
    state = load_file(tmp_path / "nan-teacher" / "model.safetensors")
    state["qa_outputs.bias"] = torch.tensor([float("inf"), 0.0])
    save_file(state, tmp_path / "nan-teacher" / "model.safetensors")
    # load_model refuses a non-finite weight; a finite one that overflows float16 passes it
    state["qa_outputs.bias"] = torch.tensor([1e6, 0.0])
    save_file(state, tmp_path / "nan-teacher" / "model.safetensors")
    from tinyqa import cli
    from tinyqa.train import train
    with pytest.raises(TinyQAError, match="the teacher gives NaN or infinite logits"):
        train(cli.distill_args(["--train", str(w / "train.jsonl.gz"), "--tokenizer", str(w / "tok"), "--init-config",
                                str(w / "cfg.json"), "--teacher", str(tmp_path / "nan-teacher"), "--max-seq-len",
                                "128", "--doc-stride", "32", "--epochs", "1", "--batch-size", "8", "--quiet",
                                "--out", str(tmp_path / "o"), "--feature-store", str(w / "fs"),
                                "--teacher-cache", str(tmp_path / "tc")]))
    assert not [p for p in os.listdir(tmp_path / "tc") if not p.endswith(".lock")]  # nothing half-made kept


def test_a_teacher_replaced_by_a_copy_keeping_size_and_mtime_is_not_reused(small_run, tmp_path):
    """cp -p, rsync -a and tar x keep a file's size and mtime: the cache key is its content, not those."""
    w = small_run
    shutil.copytree(w / "teacher", tmp_path / "teacher")
    distill_with = lambda out: distill(w, out, "--teacher", str(tmp_path / "teacher"))  # noqa: E731
    distill_with(tmp_path / "a")
    n_before = len(os.listdir(w / "tc"))
    other = tmp_path / "other.safetensors"
    state = load_file(tmp_path / "teacher" / "model.safetensors")
    state["qa_outputs.bias"] = state["qa_outputs.bias"] + 1.0  # same shapes, so the same size
    save_file(state, other, metadata={"format": "pt"})
    target = tmp_path / "teacher" / "model.safetensors"
    st = os.stat(target)
    shutil.copyfile(other, target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p leaves it
    assert os.stat(target).st_size == st.st_size and os.stat(target).st_mtime_ns == st.st_mtime_ns
    distill_with(tmp_path / "b")
    assert len(os.listdir(w / "tc")) > n_before  # a new cache for the new teacher


def test_waiting_for_a_store_names_the_store(small_run, tmp_path):
    from tinyqa.files import lock
    said = []
    with lock(str(tmp_path / "x.lock"), print, "the same feature store"):
        t = threading.Thread(target=lambda: lock(str(tmp_path / "x.lock"), said.append,
                                                 "the same feature store").__enter__())
        t.start()
        t.join(1)
    t.join(10)
    assert said and "feature store" in said[0] and "teacher" not in said[0]


# --- model files: values that make no model, tensors that are not weights, links that lead nowhere

@pytest.mark.parametrize("change,says", [
    ({"hidden_size": 0}, "hidden_size=0"), ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers=-1"), ({"intermediate_size": 0}, "intermediate_size=0"),
    ({"vocab_size": 0}, "vocab_size=0"), ({"hidden_size": 31}, "not divisible"), ({"hidden_size": "32"}, "hidden_size='32'"),
    ({"hidden_size": True}, "hidden_size=True"), ({"hidden_size": 32.0}, "hidden_size=32.0"),
    ({"max_position_embeddings": 2}, "leaves no position"), ({"pad_token_id": 99999}, "pad_token_id=99999"),
    ({"layer_norm_eps": 0}, "layer_norm_eps=0"), ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob=1.5"),
    ({"type_vocab_size": -1}, "type_vocab_size=-1"), ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"relative_attention": True}, "relative_attention"), ({"max_relative_positions": "x"}, "max_relative_positions"),
])
def test_config_values_that_make_no_model(ckpt, tmp_path, change, says):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(TinyQAError) as e:
        load_model_config(str(d))
    assert says in str(e.value) and "config.json" in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("content,says", [("[" * 5000 + "]" * 5000, "nested too deeply"), ("[1, 2]", "config"),
                                          ('{"hidden_size": 1' + "0" * 5000 + "}", "not usable JSON")])
def test_config_json_that_is_not_a_config(ckpt, tmp_path, content, says):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    (d / "config.json").write_text(content)
    with pytest.raises(TinyQAError, match=says):
        load_model(str(d))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_tensors_are_not_taken_for_weights(ckpt, tmp_path, dtype):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    state = load_file(d / "model.safetensors")
    name = "roberta.encoder.layer.0.attention.self.query.weight"
    state[name] = state[name].to(dtype)
    save_file(state, d / "model.safetensors")
    with pytest.raises(TinyQAError, match=f"{name}: holds {str(dtype).removeprefix('torch.')}"):
        load_model(str(d))


@pytest.mark.parametrize("what", ["folder", "config.json", "model.safetensors"])
def test_symlink_loops_are_named_as_such(ckpt, tmp_path, what):
    d = tmp_path / "m"
    if what == "folder":
        os.symlink(tmp_path / "loop2", d)
        os.symlink(d, tmp_path / "loop2")
    else:
        shutil.copytree(ckpt, d)
        (d / what).unlink()
        os.symlink(d / what, d / what)
    with pytest.raises(TinyQAError, match="symbolic link"):
        load_model(str(d))


# --- the Python API's options: every value checked, none ignored

@pytest.mark.parametrize("call,says", [
    (lambda d: QuestionAnswerer.from_pretrained(d, quantize="int4"), "quantize='int4'"),
    (lambda d: QuestionAnswerer.from_pretrained(d, quantize=True), "quantize=True"),
    (lambda d: QuestionAnswerer.from_pretrained(d, prepack="yes"), "prepack must be True or False"),
    (lambda d: QuestionAnswerer.from_pretrained(d, batch_size=0), "batch_size must be"),
    (lambda d: QuestionAnswerer.from_pretrained(d, dcfg=DecodeConfig(top_k=0)), "top_k must be"),
    (lambda d: QuestionAnswerer.from_pretrained(d, dcfg=DecodeConfig(n_best="20")), "n_best must be"),
    (lambda d: QuestionAnswerer.from_pretrained(d, fcfg=FeaturizerConfig(max_seq_len=-5)), "max_seq_len must be"),
    (lambda d: QuestionAnswerer.from_pretrained(d, dcfg=DecodeConfig(align_to_words=1)), "align_to_words must be"),
    (lambda d: QuestionAnswerer.from_pretrained(d, device="gpu"), "unknown device"),
])
def test_api_option_values_are_refused_not_ignored(ckpt, call, says):
    with pytest.raises(TinyQAError, match=says.replace("(", r"\(")):
        call(str(ckpt))


def test_a_tokenizer_much_smaller_than_the_embedding_is_said(ckpt, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    small = train_tokenizer(["Ada Berg was born in Oslo. Where was Ada Berg born?"] * 5, 300)
    save_tokenizer(small, d)
    QuestionAnswerer.from_pretrained(str(d)).answer("Where was Ada Berg born?", CTX)
    assert "notice: the tokenizer has" in capsys.readouterr().err


def test_training_spans_that_do_not_hold_their_text_are_left_out_and_said(tmp_path, capsys):
    from tinyqa import cli
    from tinyqa.train import train
    rows = make_dataset(6, seed=9)
    rows[0]["qas"][0]["detected_answers"][0]["text"] = "something else entirely"
    write_mrqa(tmp_path / "train.jsonl.gz", rows)
    tok = train_tokenizer([r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]], 300)
    save_tokenizer(tok, tmp_path / "tok")
    (tmp_path / "cfg.json").write_text(json.dumps(dict(vocab_size=tok.get_vocab_size(), hidden_size=16,
                                                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                                       max_position_embeddings=130)))
    argv = ["--train", str(tmp_path / "train.jsonl.gz"), "--tokenizer", str(tmp_path / "tok"), "--init-config",
            str(tmp_path / "cfg.json"), "--max-seq-len", "128", "--doc-stride", "32", "--epochs", "1", "--quiet",
            "--feature-store", str(tmp_path / "fs"), "--save-every", "0"]
    train(cli.finetune_args([*argv, "--out", str(tmp_path / "a")]))
    out = capsys.readouterr().out
    assert "1 training questions have an answer span that does not hold their answer text" in out
    assert rows[0]["qas"][0]["qid"] in out
    train(cli.finetune_args([*argv, "--out", str(tmp_path / "b")]))  # reused: said again
    assert "1 whose span does not hold their answer text" in capsys.readouterr().out


def test_a_disk_that_fills_during_a_checkpoint_stops_the_run_and_it_resumes(tmp_path):
    """Writes beyond a file-size limit fail as on a full disk: the run stops with one line naming the last
    complete checkpoint (never a traceback, never 'saved'), and --resume from it finishes the run."""
    rows = make_dataset(30, seed=1)
    write_mrqa(tmp_path / "train.jsonl.gz", rows)
    tok = train_tokenizer([r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]], 400)
    save_tokenizer(tok, tmp_path / "tok")
    (tmp_path / "cfg.json").write_text(json.dumps(dict(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                                       max_position_embeddings=130)))
    common = ["--train", "train.jsonl.gz", "--init-config", "cfg.json", "--tokenizer", "tok", "--max-seq-len", "128",
              "--doc-stride", "32", "--batch-size", "8", "--epochs", "2", "--save-every", "4", "--out", "run",
              "--quiet", "--feature-store", "fs"]
    # the store and the model files fit under the limit; the first training_state.pt (optimizer state) does not
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000)); "
            "sys.argv = ['train_finetune.py'] + sys.argv[1:]; sys.path.insert(0, '.'); "
            "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    shutil.copy(ROOT / "train_finetune.py", tmp_path / "train_finetune.py")
    r = subprocess.run([sys.executable, "-c", code, *common], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=env)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "checkpoint-4" in err[0] and "cannot write" in err[0], r.stderr
    assert "saved" not in r.stdout and not (tmp_path / "run" / "model.safetensors").exists()
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]  # nothing half-written left
