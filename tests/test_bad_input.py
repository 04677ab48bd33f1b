"""The bad-input corpus: every entry point fed bad flags, bad files, bad models and bad checkpoints.

Entry points: evaluate.py, train_finetune.py, train_distill.py, `python -m tinyqa answer` and the Python
API. For each case the test asserts the exit code; that stderr holds one line (for a flag out of range,
argparse's usage and its `error: argument --flag` line), no traceback, and names the flag or file and
line; and that nothing was written or destroyed: the files around the run (an existing --output, a
refused --out's run, the models and data) are byte-identical afterwards.

Most cases call the scripts' main() in-process, which is cheap; those marked `sub` run the real
command in a subprocess, to show the same holds for what a user types (and the hub cases need their own
environment). Tiny models, data, checkpoints and broken variants of each are made once per module.
"""
import gzip
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file

from tinyqa import EncoderConfig, EncoderForQA, QuestionAnswerer, TinyQAError, load_model, load_tokenizer, save_pretrained
from tinyqa.errors import cli_errors
from tinyqa.features import FeaturizerConfig
from tinyqa.infer import predict
from tinyqa.examples import ReadReport
from tinyqa.mrqa import read_mrqa
from tinyqa.synthetic import make_dataset, train_tokenizer, write_mrqa
from tinyqa.tokenizer import save_tokenizer
from tinyqa import cli
from tinyqa.train import train

# --- bad MRQA files: name -> (lines, or bytes; what the error must say)

CTX = "Ada Berg was born in Oslo."
HEADER = json.dumps({"header": {"dataset": "Toy", "split": "dev"}})


def qa(qid="q1", **over):
    d = {"qid": qid, "question": "Where was Ada Berg born?", "answers": ["Oslo"],
         "detected_answers": [{"text": "Oslo", "char_spans": [[21, 24]]}]}
    d.update(over)
    return d


def line(*qas, context=CTX):
    return json.dumps({"context": context, "qas": list(qas)}, ensure_ascii=False)


def text(*lines):
    return ("\n".join(lines) + "\n").encode()


def cut_gzip():
    data = gzip.compress(text(HEADER, *[line(qa(f"q{i}")) for i in range(300)]))
    return data[: len(data) * 2 // 3]


def corrupt_gzip():
    data = bytearray(gzip.compress(text(HEADER, *[line(qa(f"q{i}", question=f"Where {i}?")) for i in range(300)])))
    data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
    return bytes(data)


BAD = {
    "not-json.jsonl": (text(HEADER, line(qa()), "{oops"), ["not-json.jsonl:3:", "not valid JSON"]),
    "row-not-object.jsonl": (text(HEADER, "[1, 2]"), ["row-not-object.jsonl:2:", "not an object"]),
    "context-null.jsonl": (text(json.dumps({"context": None, "qas": [qa()]})), ["context-null.jsonl:1:", "'context'"]),
    "context-blank.jsonl": (text(line(qa(), context="   ")), ["context-blank.jsonl:1:", "'context'"]),
    "qas-not-list.jsonl": (text(json.dumps({"context": CTX, "qas": {"q": 1}})), ["qas-not-list.jsonl:1:", "'qas'"]),
    "qa-not-object.jsonl": (text(line("q1")), ["qa-not-object.jsonl:1:", "qas[0] is a str"]),
    "qid-null.jsonl": (text(line(qa(qid=None))), ["qid-null.jsonl:1:", "'qid'"]),
    "question-null.jsonl": (text(HEADER, line(qa(question=None))), ["question-null.jsonl:2:", "'question'"]),
    "question-blank.jsonl": (text(line(qa(question=" \t"))), ["question-blank.jsonl:1:", "'question'"]),
    "answers-string.jsonl": (text(line(qa(answers="Oslo"))), ["answers-string.jsonl:1:", "list of strings"]),
    "answers-ints.jsonl": (text(line(qa(answers=[1, 2]))), ["answers-ints.jsonl:1:", "list of strings"]),
    "answers-empty.jsonl": (text(line(qa(answers=[]))), ["answers-empty.jsonl:1:", "'answers' is empty"]),
    "span-outside.jsonl": (text(line(qa(detected_answers=[{"text": "Oslo", "char_spans": [[21, 99]]}]))),
                           ["span-outside.jsonl:1:", "outside the context"]),
    "span-not-ints.jsonl": (text(line(qa(detected_answers=[{"text": "Oslo", "char_spans": [["a", 3]]}]))),
                            ["span-not-ints.jsonl:1:", "char_spans[0]"]),
    "detected-not-list.jsonl": (text(line(qa(detected_answers="Oslo"))), ["detected-not-list.jsonl:1:", "detected_answers"]),
    "dup-qid.jsonl": (text(line(qa("q1")), line(qa("q2")), line(qa("q1"))),
                      ["dup-qid.jsonl:3:", "qid q1 was already read at", "dup-qid.jsonl:1"]),
    "header-twice.jsonl": (text(HEADER, line(qa()), HEADER), ["header-twice.jsonl:3:", "header"]),
    "non-utf8.jsonl": (text(HEADER).replace(b"\n", b"") + b"\n" + line(qa(), context="Ada Berg was born in Orl\u00e9ans.").encode("latin-1")
                       + b"\n", ["non-utf8.jsonl:2:", "not UTF-8"]),
    "utf16.jsonl": ((HEADER + "\n" + line(qa()) + "\n").encode("utf-16"), ["utf16.jsonl", "UTF-16"]),
    "cut.jsonl.gz": (cut_gzip(), ["cut.jsonl.gz:", "cut or corrupt"]),
    "corrupt.jsonl.gz": (corrupt_gzip(), ["corrupt.jsonl.gz:"]),
    "empty.jsonl": (b"", ["empty.jsonl", "no questions", "empty"]),
    "header-only.jsonl.gz": (gzip.compress(text(HEADER)), ["header-only.jsonl.gz", "no questions"]),
    "all-bad.jsonl": (text("{", "[]"), ["all-bad.jsonl:1:", "not valid JSON"]),
}
# What read_mrqa alone says (the "no questions" ones are the callers' rule: read_files).
READER_SILENT = {"empty.jsonl", "header-only.jsonl.gz"}


# --- the world: tiny models, data and checkpoints, and broken copies of each (made once)

WIN = "--max-seq-len 128 --doc-stride 32"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    rows, dev = make_dataset(8, seed=3), make_dataset(4, seed=4, split="dev")
    write_mrqa(w / "train.jsonl.gz", rows)
    write_mrqa(w / "dev.jsonl.gz", dev, split="dev")
    shutil.copy(w / "dev.jsonl.gz", w / "dev-copy.jsonl.gz")
    no_span = [dict(r, qas=[dict(q, detected_answers=[]) for q in r["qas"]]) for r in rows]
    write_mrqa(w / "nospan.jsonl.gz", no_span)
    texts = [r["context"] for r in rows + dev] + [q["question"] for r in rows + dev for q in r["qas"]]
    tok = train_tokenizer(texts, 300)
    V = tok.get_vocab_size()
    save_tokenizer(tok, w / "tok")
    # same size, other merges (a teacher/student mismatch); and more ids than the model has rows
    save_tokenizer(train_tokenizer([f"zebra quartz {i} jumps over vexed wombats" for i in range(300)], V), w / "tok-other")
    big = train_tokenizer(texts, 600)
    assert big.get_vocab_size() > V
    save_tokenizer(big, w / "tok-big")
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=130, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (w / "cfg.json").write_text(json.dumps(cfg))
    (w / "cfg-inf.json").write_text(json.dumps({**cfg, "initializer_range": 1e30}))  # logits overflow at once
    (w / "cfg-4heads.json").write_text(json.dumps({**cfg, "num_attention_heads": 4}))  # not the teacher's 2
    torch.manual_seed(0)
    save_pretrained(EncoderForQA(EncoderConfig(**cfg)), w / "model", tokenizer=tok)
    (w / "model" / "args.json").write_text(json.dumps({"max_seq_len": 128, "doc_stride": 32, "max_question_len": 64}))
    save_pretrained(EncoderForQA(EncoderConfig(**{**cfg, "max_position_embeddings": 66})), w / "short", tokenizer=tok)

    def variant(name, edit):
        shutil.copytree(w / "model", w / name)
        edit(w / name)

    def nan(d):
        state = load_file(d / "model.safetensors")
        state["roberta.encoder.layer.0.attention.self.value.weight"][3, 5] = float("nan")
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})

    variant("nan", nan)
    variant("trunc", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:3000]))
    variant("noconfig", lambda d: (d / "config.json").unlink())
    variant("badconfig", lambda d: (d / "config.json").write_text('{"hidden_size": 32,'))
    variant("badargs", lambda d: (d / "args.json").write_text('{"max_seq_len": 12'))
    variant("bigtok", lambda d: shutil.copy(w / "tok-big" / "tokenizer.json", d / "tokenizer.json"))
    (w / "bad").mkdir()
    for name, (data, _) in BAD.items():
        (w / "bad" / name).write_bytes(data)
    (w / "preds-bad.json").write_text('{"q": ')
    (w / "preds-list.json").write_text('["Oslo"]')
    (w / "preds-ints.json").write_text('{"q": 3}')
    # checkpoints: one step of fine-tuning and of distillation, and damaged copies
    common = f"--train {w}/train.jsonl.gz --init-config {w}/cfg.json --tokenizer {w}/tok {WIN} --batch-size 8 " \
             "--epochs 2 --stop-after 1 --save-every 0 --quiet --device cpu"
    train(cli.finetune_args(shlex.split(f"{common} --out {w}/ft-run")))
    train(cli.distill_args(shlex.split(f"{common} --teacher {w}/model --teacher-cache {w}/tcache "
                                                    f"--out {w}/ds-run")))
    for name, file, damage in (("broken-state", "training_state.pt", lambda b: b[: len(b) // 2]),
                               ("broken-args", "args.json", lambda b: b[:40])):
        shutil.copytree(w / "ft-run" / "checkpoint-1", w / name / "checkpoint-1")
        p = w / name / "checkpoint-1" / file
        p.write_bytes(damage(p.read_bytes()))
    return w


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A fresh working folder (the cwd) holding an earlier --output and --metrics that must survive."""
    (tmp_path / "preds.json").write_text('{"earlier": "predictions"}')
    (tmp_path / "metrics.json").write_text('{"earlier": "metrics"}')
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINYQA_CACHE", str(tmp_path / "cache"))
    return tmp_path


# --- running an entry point

def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _answer(argv):
    from tinyqa.__main__ import main
    main(["answer", *argv])


ENTRIES = {"evaluate": lambda argv: _script("evaluate")(argv), "finetune": lambda argv: _script("train_finetune")(argv),
           "distill": lambda argv: _script("train_distill")(argv), "answer": _answer}
COMMANDS = {"evaluate": [str(ROOT / "evaluate.py")], "finetune": [str(ROOT / "train_finetune.py")],
            "distill": [str(ROOT / "train_distill.py")], "answer": ["-m", "tinyqa", "answer"]}


def run(entry, argv, capsys, sub=False, env=None, cwd=None):
    """(exit code, stderr) of one entry point, in-process (main(argv) inside cli_errors) or as a command."""
    if sub:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
        r = subprocess.run([sys.executable, *COMMANDS[entry], *argv], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=300)
        return r.returncode, r.stderr
    capsys.readouterr()
    code = 0
    try:
        with cli_errors():
            ENTRIES[entry](argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def snapshot(*folders):
    """{path: sha1 of the bytes, or 'dir'} of everything under the folders."""
    out = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            out.update({os.path.join(root, d): "dir" for d in dirs})
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    out[os.path.join(root, f)] = hashlib.sha1(fh.read()).hexdigest()
    return out


@dataclass
class Case:
    id: str
    entry: str
    argv: str  # {w}: the world folder, {o}: this case's working folder (also the cwd)
    says: tuple = ()  # substrings of the error line (the flag, the file and line, the reason)
    flag_range: bool = False  # refused by argparse: usage, then `prog: error: argument --flag: ...`
    sub: bool = False
    env: tuple = ()  # extra environment for a subprocess case, {o} substituted
    may_create: tuple = ()  # what the case may legitimately leave in {o} (e.g. a teacher cache)


E = "--model {w}/model --data {w}/dev.jsonl.gz --quiet --output {o}/preds.json --metrics {o}/metrics.json"
F = f"--train {{w}}/train.jsonl.gz --init-config {{w}}/cfg.json --tokenizer {{w}}/tok {WIN} --batch-size 8 --epochs 1 " \
    "--save-every 0 --quiet --device cpu --out {o}/run"
F_MODEL = f"--train {{w}}/train.jsonl.gz --tokenizer {{w}}/tok {WIN} --batch-size 8 --epochs 1 --save-every 0 --quiet " \
          "--device cpu --out {o}/run"  # without --init-config: the weights come from --model / --student
D = F + " --teacher {w}/model --teacher-cache {o}/tcache"
DI = F + " --teacher {w}/model --stage intermediate"
A = "--model {w}/model --question Where? --context Oslo"
UNREACHABLE_HUB = (("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HOME", "{o}/hf"))

CASES = [
    # evaluate.py: flag ranges
    *[Case(f"evaluate{f}={v}", "evaluate", f"{E} {f} {v}", (f"argument {f}",), flag_range=True) for f, v in (
        ("--batch-size", "0"), ("--n-best", "0"), ("--max-answer-len", "-3"), ("--limit", "0"), ("--threads", "0"),
        ("--doc-stride", "-1"), ("--max-seq-len", "many"), ("--max-question-len", "0"), ("--dtype", "fp8"))],
    Case("evaluate-split-and-data", "evaluate", f"{E} --split test", ("--split or --data",), flag_range=True, sub=True),
    # evaluate.py: data files
    Case("evaluate-data-missing", "evaluate", f"{E} --data {{o}}/missing.jsonl", ("--data", "missing.jsonl", "no such file")),
    Case("evaluate-data-dir", "evaluate", f"{E} --data {{w}}/bad", ("--data", "is a directory")),
    Case("evaluate-data-twice", "evaluate", f"{E} --data {{w}}/dev.jsonl.gz {{w}}/dev.jsonl.gz", ("given twice",)),
    Case("evaluate-qid-in-two-files", "evaluate", f"{E} --data {{w}}/dev.jsonl.gz {{w}}/dev-copy.jsonl.gz",
         ("dev-copy.jsonl.gz:2:", "already read at", "dev.jsonl.gz:2")),
    *[Case(f"evaluate-{name}", "evaluate", f"{E} --data {{w}}/bad/{name}", tuple(says), sub=name == "cut.jsonl.gz")
      for name, (_, says) in BAD.items()],
    Case("evaluate-skip-bad-all-skipped", "evaluate", f"{E} --data {{w}}/bad/all-bad.jsonl --skip-bad",
         ("all-bad.jsonl", "no questions", "all 2 were skipped")),
    # evaluate.py: the model
    Case("evaluate-model-missing", "evaluate", f"{E} --model ./nope", ("--model ./nope", "no such directory")),
    Case("evaluate-model-missing-under-existing-folder", "evaluate", f"{E} --model runs/nope",
         ("--model runs/nope", "no such directory")),
    Case("evaluate-model-is-a-file", "evaluate", f"{E} --model {{w}}/cfg.json", ("--model", "is a file")),
    Case("evaluate-model-unknown", "evaluate", f"{E} --model no-such-model", ("--model no-such-model", "unknown model")),
    Case("evaluate-model-hub-unreachable", "evaluate", f"{E} --model someone/some-model",
         ("--model someone/some-model", "HF_HUB_OFFLINE=1", "no local directory"), sub=True, env=UNREACHABLE_HUB,
         may_create=("hf",)),
    Case("evaluate-model-no-config", "evaluate", f"{E} --model {{w}}/noconfig", ("noconfig", "no config.json")),
    Case("evaluate-model-bad-config", "evaluate", f"{E} --model {{w}}/badconfig", ("badconfig/config.json",)),
    Case("evaluate-model-truncated", "evaluate", f"{E} --model {{w}}/trunc", ("trunc/model.safetensors", "truncated")),
    Case("evaluate-model-nan", "evaluate", f"{E} --model {{w}}/nan",
         ("roberta.encoder.layer.0.attention.self.value.weight", "NaN"), sub=True),
    Case("evaluate-model-bad-args-json", "evaluate", f"{E} --model {{w}}/badargs", ("badargs/args.json",)),
    Case("evaluate-tokenizer-too-big", "evaluate", f"{E} --model {{w}}/bigtok", ("not this model's tokenizer",)),
    # evaluate.py: device, dtype, windows
    Case("evaluate-device-unknown", "evaluate", f"{E} --device gpu", ("--device 'gpu'", "unknown device")),
    Case("evaluate-device-cuda", "evaluate", f"{E} --device cuda:99", ("--device cuda:99",)),
    Case("evaluate-int8-bf16", "evaluate", f"{E} --dtype bf16 --quantize int8", ("--quantize int8", "--dtype")),
    Case("evaluate-window-too-long", "evaluate", f"{E} --max-seq-len 512", ("128 positions", "--max-seq-len 128")),
    Case("evaluate-window-no-room", "evaluate", f"{E} --max-seq-len 64 --max-question-len 60", ("--doc-stride",)),
    # evaluate.py: outputs (checked before the model is loaded)
    Case("evaluate-output-no-folder", "evaluate", f"{E} --output {{o}}/no/such/p.json", ("--output", "no such directory")),
    Case("evaluate-output-is-folder", "evaluate", f"{E} --output {{o}}", ("--output", "is a directory")),
    Case("evaluate-output-is-metrics", "evaluate", f"{E} --metrics {{o}}/preds.json", ("--output and --metrics",)),
    Case("evaluate-output-is-data", "evaluate", f"{E} --output {{w}}/dev.jsonl.gz", ("--output", "also an input")),
    # evaluate.py: --predictions and the official splits
    Case("evaluate-predictions-missing", "evaluate", f"{E} --predictions {{o}}/none.json", ("--predictions", "no such file")),
    Case("evaluate-predictions-bad-json", "evaluate", f"{E} --predictions {{w}}/preds-bad.json", ("preds-bad.json",)),
    Case("evaluate-predictions-list", "evaluate", f"{E} --predictions {{w}}/preds-list.json", ("JSON object",)),
    Case("evaluate-predictions-not-strings", "evaluate", f"{E} --predictions {{w}}/preds-ints.json", ("answer string",)),
    Case("evaluate-manual-download", "evaluate", "--model {w}/model --split test --quiet",
         ("BioASQ", "registration page", "put it at", os.path.join("cache", "mrqa", "test", "BioASQ.jsonl.gz"))),

    # train_finetune.py: flag ranges
    *[Case(f"finetune{f}={v}", "finetune", f"{F} {f} {v}", (f"argument {f}",), flag_range=True, sub=f == "--lr" and v == "0")
      for f, v in (("--lr", "0"), ("--lr", "nan"), ("--lr", "5"), ("--epochs", "0"), ("--batch-size", "-1"),
                   ("--grad-accum", "0"), ("--warmup-proportion", "1.5"), ("--weight-decay", "-0.1"),
                   ("--max-grad-norm", "0"), ("--seed", "-1"), ("--limit", "0"), ("--save-every", "-1"),
                   ("--keep-checkpoints", "-1"), ("--stop-after", "0"), ("--max-question-len", "0"),
                   ("--precision", "fp64"))],
    # train_finetune.py: files and models, all refused before any training work
    Case("finetune-train-missing", "finetune", f"{F} --train {{o}}/none.jsonl", ("--train", "none.jsonl", "no such file")),
    Case("finetune-train-dir", "finetune", f"{F} --train {{w}}", ("--train", "is a directory")),
    Case("finetune-train-empty", "finetune", f"{F} --train {{w}}/bad/empty.jsonl", ("--train", "empty.jsonl", "no questions")),
    Case("finetune-train-malformed", "finetune", f"{F} --train {{w}}/bad/question-null.jsonl",
         ("question-null.jsonl:2:", "'question'")),
    Case("finetune-train-no-spans", "finetune", f"{F} --train {{w}}/nospan.jsonl.gz", ("no question has an answer span",)),
    Case("finetune-eval-data-malformed", "finetune", f"{F} --eval-data {{w}}/bad/not-json.jsonl", ("not-json.jsonl:3:",)),
    Case("finetune-eval-data-missing", "finetune", f"{F} --eval-data {{o}}/none.jsonl", ("--eval-data", "no such file")),
    Case("finetune-window-too-long", "finetune", f"{F} --max-seq-len 256", ("128 positions", "--max-seq-len 128")),
    Case("finetune-window-no-room", "finetune", f"{F} --max-seq-len 64 --max-question-len 60", ("--doc-stride",)),
    Case("finetune-init-config-missing", "finetune", f"{F} --init-config {{o}}/none.json", ("--init-config", "no such file")),
    Case("finetune-init-config-broken", "finetune", f"{F} --init-config {{w}}/bad/empty.jsonl", ("--init-config",)),
    Case("finetune-device-unknown", "finetune", f"{F} --device tpu9", ("--device 'tpu9'",)),
    Case("finetune-device-cuda", "finetune", f"{F} --device cuda:99", ("--device cuda:99",), sub=True),
    Case("finetune-model-missing", "finetune", f"{F_MODEL} --model ./nope", ("--model ./nope", "no such directory")),
    Case("finetune-default-model-missing", "finetune", F_MODEL, ("--model runs/distill", "no such directory")),
    Case("finetune-model-nan", "finetune", f"{F_MODEL} --model {{w}}/nan", ("attention.self.value.weight", "NaN")),
    Case("finetune-tokenizer-too-big", "finetune", f"{F} --tokenizer {{w}}/tok-big", ("not this model's tokenizer",)),
    Case("finetune-out-is-a-file", "finetune", f"{F} --out {{w}}/cfg.json", ("--out", "not a directory")),
    Case("finetune-out-holds-a-run", "finetune", f"{F} --out {{w}}/ft-run", ("--out", "another run", "--overwrite")),
    Case("finetune-diverges", "finetune", f"{F} --init-config {{w}}/cfg-inf.json",
         ("step 1", "loss is nan", "--init-config")),
    # train_finetune.py: --resume
    Case("finetune-resume-missing", "finetune", "--resume {o}/nope --quiet", ("--resume", "no such directory")),
    Case("finetune-resume-final-model", "finetune", "--resume {w}/model --quiet", ("not a training checkpoint",)),
    Case("finetune-resume-damaged-state", "finetune", "--resume {w}/broken-state/checkpoint-1 --quiet",
         ("training_state.pt", "damaged")),
    Case("finetune-resume-damaged-args", "finetune", "--resume {w}/broken-args/checkpoint-1 --quiet", ("args.json",)),
    Case("finetune-resume-changed-lr", "finetune", "--resume {w}/ft-run/checkpoint-1 --quiet --lr 0.5",
         ("--lr 0.5", "the run has 1e-05")),
    Case("finetune-resume-other-out", "finetune", "--resume {w}/ft-run/checkpoint-1 --quiet --out {o}/x",
         ("--out", "its own folder")),
    Case("finetune-resume-distill-checkpoint", "finetune", "--resume {w}/ds-run/checkpoint-1 --quiet",
         ("distillation checkpoint", "train_distill.py")),

    # train_distill.py
    *[Case(f"distill{f}={v}", "distill", f"{D} {f} {v}", (f"argument {f}",), flag_range=True, sub=v == "0")
      for f, v in (("--temperature", "0"), ("--temperature", "-2"), ("--distillation-loss-weight", "1.1"),
                   ("--distillation-loss-weight", "-0.5"), ("--teacher-batch-size", "0"))],
    Case("distill-teacher-missing", "distill", f"{D} --teacher ./nope", ("--teacher ./nope", "no such directory")),
    Case("distill-teacher-missing-under-existing-folder", "distill", f"{D} --teacher runs/teacher",
         ("--teacher runs/teacher", "no such directory")),
    Case("distill-teacher-is-a-file", "distill", f"{D} --teacher {{w}}/cfg.json", ("--teacher", "is a file")),
    Case("distill-teacher-hub-unreachable", "distill", f"{D} --teacher someone/teacher",
         ("--teacher someone/teacher", "HF_HUB_OFFLINE=1"), sub=True, env=UNREACHABLE_HUB, may_create=("hf",)),
    Case("distill-student-missing", "distill", f"{F_MODEL} --teacher {{w}}/model --student {{o}}/nope",
         ("--student", "no such directory")),
    Case("distill-other-tokenizer-on-the-fly", "distill", f"{D} --tokenizer {{w}}/tok-other --teacher-on-the-fly",
         ("do not share a tokenizer", "leave out --teacher-on-the-fly")),
    Case("distill-teacher-too-short", "distill", f"{D} --teacher {{w}}/short", ("64 positions", "teacher", "--max-seq-len 64")),
    Case("distill-teacher-nan", "distill", f"{D} --teacher {{w}}/nan --teacher-on-the-fly", ("value.weight", "NaN")),
    Case("distill-teacher-cache-is-a-file", "distill", f"{D} --teacher-cache {{w}}/cfg.json", ("--teacher-cache",)),
    Case("distill-diverges", "distill", f"{D} --temperature 1e-40", ("step 1", "loss is nan", "--temperature"),
         may_create=("tcache",)),
    Case("distill-resume-finetune-checkpoint", "distill", "--resume {w}/ft-run/checkpoint-1 --quiet",
         ("fine-tuning checkpoint", "train_finetune.py")),
    # train_distill.py --stage intermediate (TinyBERT's first stage) and --student-layers
    *[Case(f"distill{f}={v}", "distill", f"{DI} {f} {v}", (f"argument {f}",), flag_range=True)
      for f, v in (("--layer-map", "0"), ("--layer-map", "2,x"), ("--hidden-loss-weight", "-1"),
                   ("--attention-loss-weight", "nan"), ("--stage", "both"), ("--student-layers", "0"))],
    Case("distill-intermediate-temperature", "distill", f"{DI} --temperature 2",
         ("--temperature", "--stage prediction only")),
    Case("distill-intermediate-teacher-cache", "distill", f"{DI} --teacher-cache {{o}}/c", ("--teacher-cache",)),
    Case("distill-prediction-layer-map", "distill", f"{D} --layer-map 1", ("--layer-map", "--stage intermediate only")),
    Case("distill-layer-map-count", "distill", f"{DI} --layer-map 1,1", ("names 2 teacher layers", "student has 1")),
    Case("distill-layer-map-beyond-teacher", "distill", f"{DI} --layer-map 2", ("the teacher has only 1 layer",)),
    Case("distill-intermediate-heads-differ", "distill", f"{DI} --init-config {{w}}/cfg-4heads.json",
         ("2 attention heads", "student 4", "head by head")),
    Case("distill-student-layers-not-dividing", "distill", f"{F_MODEL} --teacher {{w}}/model --student-layers 2",
         ("1 layer cannot be split evenly among 2", "--student-layers")),
    Case("distill-student-layers-and-init-config", "distill", f"{D} --student-layers 1", ("drop --init-config",)),

    # python -m tinyqa answer (the bad input it has today)
    Case("answer-model-missing", "answer", f"{A} --model ./nope", ("./nope", "no such directory"), sub=True),
    Case("answer-model-is-a-file", "answer", f"{A} --model {{w}}/cfg.json", ("is a file",)),
    Case("answer-model-unknown", "answer", f"{A} --model no-such-model", ("unknown model 'no-such-model'",)),
    Case("answer-model-hub-unreachable", "answer", f"{A} --model someone/some-model",
         ("someone/some-model", "HF_HUB_OFFLINE=1"), sub=True, env=UNREACHABLE_HUB, may_create=("hf",)),
    Case("answer-model-nan", "answer", f"{A} --model {{w}}/nan", ("value.weight", "NaN")),
    Case("answer-model-truncated", "answer", f"{A} --model {{w}}/trunc", ("model.safetensors", "truncated")),
    Case("answer-tokenizer-too-big", "answer", f"{A} --model {{w}}/bigtok", ("not this model's tokenizer",)),
    Case("answer-context-file-missing", "answer", f"{A} --context @{{o}}/none.txt", ("none.txt", "cannot read")),
    Case("answer-context-file-is-a-folder", "answer", f"{A} --context @{{w}}/bad", ("bad", "is a directory")),
    Case("answer-device-unknown", "answer", f"{A} --device gpu", ("unknown device",)),
    Case("answer-device-cuda", "answer", f"{A} --device cuda:99", ("cuda:99",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input(case, world, work, capsys):
    fill = lambda s: s.format(w=world, o=work)
    before = snapshot(world, work)
    env = {k: fill(v) for k, v in case.env}
    code, err = run(case.entry, shlex.split(fill(case.argv)), capsys, case.sub, env, cwd=work)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    if case.flag_range:  # argparse: the usage, then one `prog: error: ...` line
        assert ": error: " in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    for s in case.says:
        assert fill(s) in lines[-1], (s, lines[-1])
    after = {p: h for p, h in snapshot(world, work).items()
             if not any(p.startswith(str(work / m)) for m in case.may_create)}
    # The cache may keep what a cache keeps (lock files, the file-hash memo, a store that was completed
    # before the run failed) but never a half-built store's temporary folder.
    cache = str(work / "cache")
    assert not [p for p in after if p.startswith(cache) and ".tmp-" in p], sorted(after)
    after = {p: h for p, h in after.items() if not p.startswith(cache)}
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


# --- the Python API

@pytest.mark.parametrize("name", [n for n in BAD if n not in READER_SILENT])
def test_api_read_mrqa_names_file_and_line(world, name):
    with pytest.raises(TinyQAError) as e:
        list(read_mrqa(world / "bad" / name))
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in BAD[name][1] if s not in ("no questions", "empty")), msg


def test_api_skip_bad_counts_every_per_line_error(world):
    """--skip-bad skips and counts decoding errors too: a non-UTF-8 line, a header out of place, a cut gzip."""
    for name, good, skipped in (("non-utf8.jsonl", 0, 1), ("header-twice.jsonl", 1, 1), ("dup-qid.jsonl", 2, 1),
                                ("not-json.jsonl", 1, 1), ("cut.jsonl.gz", None, 1)):
        report = ReadReport()
        got = list(read_mrqa(world / "bad" / name, skip_bad=True, report=report))
        assert len(report.skipped) == skipped and all(name in s for s in report.skipped), (name, report.skipped)
        if good is not None:
            assert len(got) == good, name
        else:  # a cut gzip gives every whole line before the cut, then counts the cut once
            assert 0 < len(got) < 300 and [e.qid for e in got] == [f"q{i}" for i in range(len(got))]


def test_api_bom_is_read_and_mismatched_spans_are_reported(tmp_path):
    """A UTF-8 byte-order mark is the right answer, not an error; a span whose text is not the context's
    (beyond what normalisation explains) is kept but reported."""
    p = tmp_path / "bom.jsonl"
    swapped = qa("q2", detected_answers=[{"text": "Ada", "char_spans": [[21, 24]]}])
    cased = qa("q3", detected_answers=[{"text": "the OSLO.", "char_spans": [[21, 24]]}])  # normalises equal
    p.write_bytes("\ufeff".encode() + text(HEADER, line(qa("q1"), swapped, cased)))
    report = ReadReport()
    exs = list(read_mrqa(p, report=report))
    assert [e.qid for e in exs] == ["q1", "q2", "q3"] and exs[0].dataset == "Toy" and not report.skipped
    assert len(report.warnings) == 1 and "bom.jsonl:2:" in report.warnings[0] and "'Oslo'" in report.warnings[0]


@pytest.mark.parametrize("call,says", [
    (lambda w: load_model("./nope"), "no such directory"),
    (lambda w: load_model(str(w / "cfg.json")), "is a file"),
    (lambda w: load_model(str(w / "nan")), "attention.self.value.weight holds NaN"),
    (lambda w: load_model(str(w / "trunc")), "truncated"),
    (lambda w: load_model(str(w / "badconfig")), "config.json"),
    (lambda w: load_model(str(w / "model"), device="gpu"), "unknown device"),
    (lambda w: load_model(str(w / "model"), device="cuda:99"), "cuda:99"),
    (lambda w: QuestionAnswerer.from_pretrained(str(w / "model"), dtype=torch.bfloat16, quantize="int8"), "--dtype"),
    (lambda w: load_tokenizer("./nope"), "no such directory"),
    (lambda w: predict(load_model(str(w / "model")), load_tokenizer(str(w / "tok-big")),
                       list(read_mrqa(w / "dev.jsonl.gz")), FeaturizerConfig(128, 32)), "not this model's tokenizer"),
    (lambda w: predict(load_model(str(w / "model")), load_tokenizer(str(w / "tok")),
                       list(read_mrqa(w / "dev.jsonl.gz")), FeaturizerConfig(384, 128)), "128 positions"),
], ids=["load-missing", "load-file", "load-nan", "load-truncated", "load-bad-config", "device-unknown",
        "device-cuda", "int8-bf16", "tokenizer-missing", "predict-tokenizer-too-big", "predict-window-too-long"])
def test_api_bad_input_is_one_clear_error(world, work, call, says):
    before = snapshot(world, work)
    with pytest.raises(TinyQAError) as e:
        call(world)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert snapshot(world, work) == before


# --- reported, not refused

def test_partial_predictions_are_scored_with_a_loud_warning(world, work, capsys):
    exs = list(read_mrqa(world / "dev.jsonl.gz"))
    (work / "partial.json").write_text(json.dumps({ex.qid: "x" for ex in exs[2:]}))
    code, err = run("evaluate", shlex.split(f"--predictions {work}/partial.json --data {world}/dev.jsonl.gz "
                                            f"--metrics {work}/m.json"), capsys)
    assert code == 0 and "Traceback" not in err
    assert f"warning: 2 of {len(exs)} questions have no prediction" in err and exs[0].qid in err, err
    assert json.loads((work / "m.json").read_text())["macro"]["total"] == len(exs)


def test_skip_bad_in_evaluate_reports_the_count_and_scores_the_rest(world, work, capsys):
    code, err = run("evaluate", shlex.split(f"--model {world}/model --data {world}/bad/dup-qid.jsonl --skip-bad "
                                            f"--quiet --output {work}/preds.json"), capsys)
    assert code == 0 and "skipped 1 malformed" in err and "dup-qid.jsonl:3:" in err, err
    assert set(json.loads((work / "preds.json").read_text())) == {"q1", "q2"}  # replaced whole, atomically
    assert sorted(os.listdir(work)) == ["metrics.json", "preds.json", "runs"]  # no temporary file left behind
