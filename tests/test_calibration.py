"""Calibration (tinyqa/calibration.py, `python -m tinyqa calibrate`): the fit against data drawn from a known
map, the calibration error and the null threshold against hand-computed and brute-force oracles, and the
command end to end on a trained model, whose calibration.json answer, read and evaluate.py then use."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from tinyqa import QuestionAnswerer, TinyQAError
from tinyqa.calibration import Calibration, best_null_threshold, expected_calibration_error, fit, load
from tinyqa.data import read_examples
from tinyqa.decode import DecodeConfig
from tinyqa.examples import Example
from tinyqa.infer import forward_examples, predict
from tinyqa.synthetic import make_dataset, write_mrqa


def test_fit_recovers_the_map_the_data_was_drawn_from():
    rng = np.random.default_rng(0)
    s = rng.normal(12, 5, 40_000)
    truth = Calibration(temperature=2.5, offset=11.0)
    right = rng.random(len(s)) < truth.confidence(s)
    temperature, offset = fit(s, right)
    assert temperature == pytest.approx(2.5, rel=0.05) and offset == pytest.approx(11.0, abs=0.15)


def test_fit_refuses_data_without_both_outcomes_or_without_signal():
    with pytest.raises(TinyQAError, match="both right and wrong"):
        fit([1.0, 2.0, 3.0], [1, 1, 1])
    with pytest.raises(TinyQAError, match="carry no confidence"):
        fit([1.0, 2.0, 3.0, 4.0], [1, 1, 0, 0])  # higher scores are wrong: a negative temperature


def test_expected_calibration_error_by_hand():
    # bins of width 0.5: [0.1, 0.2, 0.3] right 1 of 3 -> |1/3 - 0.2| = 0.1333; [0.9, 0.8] right 2 -> |1 - 0.85|
    ece = expected_calibration_error([0.1, 0.2, 0.3, 0.9, 0.8], [1, 0, 0, 1, 1], bins=2)
    assert ece == pytest.approx(3 / 5 * abs(1 / 3 - 0.2) + 2 / 5 * abs(1.0 - 0.85))


def test_null_threshold_is_the_best_of_every_threshold_by_squad2_rules():
    """Brute force: every candidate threshold, each question scored as SQuAD 2.0's script scores it (null
    predicted where null - best > threshold: F1 1 on an unanswerable question, 0 on an answerable one)."""
    rng = np.random.default_rng(3)
    diff, f1, has = rng.normal(0, 3, 200), rng.random(200).round(2), rng.random(200) < 0.6
    f1[~has] = 0.0

    def total(t):
        null = diff > t
        return float(np.where(null, ~has, np.where(has, f1, 0.0)).sum())
    t, score = best_null_threshold(diff, f1, has)
    best = max(total(c) for c in [*(diff - 1e-6), diff.max() + 1])
    assert total(t) == pytest.approx(best) and score == pytest.approx(100 * best / 200)


@pytest.mark.parametrize("content,says", [('{"temperature": -1}', "temperature must be a positive"),
                                          ('{"temperature": "2"}', "temperature must be"),
                                          ('{"temprature": 2}', "not a calibration"), ("[1]", "JSON dict")])
def test_a_damaged_calibration_file_is_refused(tmp_path, content, says):
    (tmp_path / "calibration.json").write_text(content)
    with pytest.raises(TinyQAError, match=says):
        load(str(tmp_path))
    assert load(str(tmp_path / "elsewhere")) == Calibration()  # none: the uncalibrated map


def to_squad2(rows, unanswerable_every=3):
    """The MRQA rows as a SQuAD 2.0 file, every third question made unanswerable (its answers removed)."""
    paragraphs = []
    for r in rows:
        qas = []
        for k, q in enumerate(r["qas"]):
            gone = len(qas) % unanswerable_every == 0
            s, e = q["detected_answers"][0]["char_spans"][0]
            qas.append({"id": q["qid"], "question": q["question"], "is_impossible": gone,
                        "answers": [] if gone else [{"text": r["context"][s:e + 1], "answer_start": s}]})
        paragraphs.append({"context": r["context"], "qas": qas})
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}


def test_calibrate_end_to_end(synth, teacher, tmp_path):
    """On the trained teacher: calibration.json written with a map that lowers the calibration error on the
    data it was fitted on, a null threshold from the SQuAD 2.0 file, the diagram drawn; then the answer API's
    confidence and evaluate.py's null answers follow it."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(teacher, model)
    heldout = write_mrqa(tmp_path / "heldout.jsonl.gz", make_dataset(30, seed=77, split="dev"), split="dev")
    (tmp_path / "v2.json").write_text(json.dumps(to_squad2(make_dataset(30, seed=78, split="dev"))))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "tinyqa", "calibrate", "--model", str(model), "--data", synth["dev"],
                        str(tmp_path / "v2.json"), "--heldout", str(heldout), "--plot", str(tmp_path / "rel.png")],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    saved = json.loads((model / "calibration.json").read_text())
    ece = saved["fitted_on"]["ece"]
    assert ece["data"]["after"] < ece["data"]["before"] and "heldout.jsonl.gz" in ece
    assert saved["temperature"] > 0 and saved["null_threshold"] is not None
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    qa = QuestionAnswerer.from_pretrained(str(model))
    question, context = "Where was Ada Berg born?", "Ada Berg was born in Oslo."
    a = qa.answer(question, context)
    _, (s,), (e,) = forward_examples(qa.model, qa.tokenizer, [Example("q", question, context, [])], qa.fcfg)
    z = (a.logit_score - (s[0] + e[0]) - saved["offset"]) / saved["temperature"]  # above the window's null score
    assert a.confidence == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-5)
    # evaluate.py decodes the SQuAD 2.0 file with the fitted threshold, or the one --null-threshold names
    examples = list(read_examples(tmp_path / "v2.json"))
    for threshold, flag in ((saved["null_threshold"], []), (-1e9, ["--null-threshold=-1e9"])):
        out = tmp_path / f"p{len(flag)}.json"
        r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(model), "--data",
                            str(tmp_path / "v2.json"), "--handle-impossible-answer", "--quiet", "--output", str(out),
                            *flag], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        want = predict(qa.model, qa.tokenizer, examples, qa.fcfg,
                       DecodeConfig(handle_impossible_answer=True, null_threshold=threshold))
        assert json.loads(out.read_text()) == {q: p.text for q, p in want.items()}
    assert set(json.loads(out.read_text()).values()) == {""}  # -1e9: the null answer everywhere


def test_bench_calibration_splits_by_article_and_leaves_the_run_alone(synth, teacher, tmp_path):
    """benchmarks/bench_calibration.py on a run folder shaped like real_squad.py's: the held-out articles
    split in two disjoint halves (fit, report), a SQuAD v1.1 out-of-domain file, and the calibration written
    into a copy, never into the run's own checkpoint."""
    import gzip
    import importlib.util
    import shutil
    run = tmp_path / "run"
    shutil.copytree(teacher, run / "teacher")
    rows = make_dataset(24, seed=79, split="dev")
    for i, r in enumerate(rows):  # real_squad.py's context ids: "<article title>-<n>"
        r["id"] = f"article{i // 3}-{i % 3}"
    write_mrqa(run / "heldout.jsonl.gz", rows, split="heldout")
    spec = importlib.util.spec_from_file_location("bench_calibration", ROOT / "benchmarks" / "bench_calibration.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--run", str(run), "--ood-contexts", "20", "--bins", "5"])
    out = run / "calibration"

    def articles(name):
        with gzip.open(out / name, "rt", encoding="utf-8") as f:
            return {json.loads(line)["id"].rsplit("-", 1)[0] for line in f if '"header"' not in line[:12]}
    fit_side, report_side = articles("calibration.jsonl.gz"), articles("in-domain.jsonl.gz")
    assert len(fit_side) == 4 and fit_side | report_side == {f"article{k}" for k in range(8)}
    assert not fit_side & report_side
    ood = json.loads((out / "out-of-domain.json").read_text())
    assert ood["version"] == "1.1" and len(ood["data"]) == 20
    assert set(result.fitted_on["ece"]) == {"data", "in-domain.jsonl.gz", "out-of-domain.json"}
    assert json.loads((out / "teacher" / "calibration.json").read_text())["temperature"] == result.temperature
    assert not (run / "teacher" / "calibration.json").exists()
