"""`python -m tinyqa demo` at a reduced size: it runs offline, learns what it claims, and leaves checkpoints
that evaluate.py and `python -m tinyqa answer` accept."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT

# A third of the data and two seeds (about two minutes on 2 cores); the full-size numbers are in
# tinyqa/demo.py's docstring.
SMALL = ["--train-contexts", "1000", "--student-contexts", "250", "--dev-contexts", "60", "--teacher-epochs", "4",
         "--student-epochs", "10", "--seeds", "2", "--quiet"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = subprocess.run([sys.executable, "-m", "tinyqa", "demo", "--out", str(out), *SMALL],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout, json.loads((out / "results.json").read_text())


def test_demo_learns(demo):
    """Every trained model ends well above the untrained students. Measured at this size (seeded, 2-core CPU):
    teacher F1 76.5; seed 0: untrained student 9.7, distilled 48.0, CE-only 23.9; seed 1: 7.1, 37.7, 27.4."""
    out, stdout, res = demo
    for tag in ("", "-seed1"):
        init = res[f"student-init{tag}"]["f1"]
        assert init < 20, init
        for name in ("student-distilled", "student-ce"):
            assert res[name + tag]["f1"] > init + 8, (name + tag, res[name + tag], init)
    assert res["teacher"]["f1"] > 40 and res["teacher"]["f1"] > res["student-init"]["f1"] + 30, res["teacher"]
    # the summary is what the table holds, per seed, and the verdict follows its signs
    gains = [res[f"student-distilled{t}"]["f1"] - res[f"student-ce{t}"]["f1"] for t in ("", "-seed1")]
    g = res["summary"]["distilled_minus_ce"]
    assert g["values"] == pytest.approx(gains) and g["mean"] == pytest.approx(sum(gains) / 2)
    verdict = "beat" if min(gains) > 0 else "lost to" if max(gains) < 0 else "neither clearly beat nor lost to"
    assert f"distillation {verdict} CE-only training" in stdout and f"F1 {g['mean']:+.2f} on average" in stdout
    assert res["teacher"]["parameters"] > res["student-ce"]["parameters"] == res["student-distilled"]["parameters"]
    for name in ("train.jsonl.gz", "train-students.jsonl.gz", "dev.jsonl.gz", "tokenizer/tokenizer.json",
                 "teacher/model.safetensors", "student-distilled/config.json", "student-ce-seed1/tokenizer.json"):
        assert (out / name).exists(), name


def test_demo_checkpoints_work_with_evaluate_and_answer(demo, tmp_path):
    out, _, res = demo
    met = tmp_path / "m.json"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(out / "student-distilled"),
                        "--data", str(out / "dev.jsonl.gz"), "--metrics", str(met), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    # evaluate.py picks the 128-token windows up from the checkpoint's args.json and scores the same
    assert json.loads(met.read_text())["macro"]["f1"] == pytest.approx(res["student-distilled"]["f1"])
    context = "Ada Berg was born in Oslo. Bruno Weber works as a pilot."
    r = subprocess.run([sys.executable, "-m", "tinyqa", "answer", "--model", str(out / "teacher"), "--question",
                        "Where was Ada Berg born?", "--context", context, "--json"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    assert context[a["start"]:a["end"]] == a["text"]
