"""The official MRQA / SQuAD v1.1 metric: hand-computed cases and a re-statement of its rules."""
import json
import random
import re
import string
import subprocess
import sys

import pytest
from conftest import ROOT

from tinyqa.metrics import exact_match, f1, normalize_answer, score, score_datasets
from tinyqa.examples import Example
from tinyqa.mrqa import read_mrqa


def test_hand_computed_cases():
    assert normalize_answer("  The  Quick, brown FOX!! ") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # 'the' only as a word
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert f1("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2))
    # "a" is an article: pred = b b c, gold = b b b d; overlap b twice: P = 2/3, R = 2/4, F1 = 4/7
    assert f1("a b b c", "b b b d") == pytest.approx(4 / 7)
    assert f1(".", ".") == 0.0 and exact_match(".", ".") == 1.0  # both normalise to nothing
    exs = [Example("1", "", "", ["Paris", "City of Paris"]), Example("2", "", "", ["1990"]), Example("3", "", "", ["x"])]
    r = score({"1": "city of paris", "2": "in 1990"}, exs)  # qid 3 unanswered: 0
    assert r["total"] == 3
    assert r["exact_match"] == pytest.approx(100 / 3)
    assert r["f1"] == pytest.approx(100 * (1 + 2 * 0.5 * 1 / 1.5) / 3)


def _official_restated(pred, gold):
    """The official rules written a second, independent way (translate tables, explicit token loops)."""
    def norm(s):
        s = s.lower().translate(str.maketrans("", "", string.punctuation))
        words = [w for w in re.split(r"\s+", s) if w and w not in ("a", "an", "the")]
        # the official regex drops articles only as whole words between \b's; splitting first is the same
        return words
    p, g = norm(pred), norm(gold)
    em = float(" ".join(p) == " ".join(g))
    common = 0
    remaining = list(g)
    for w in p:
        if w in remaining:
            remaining.remove(w)
            common += 1
    if common == 0:
        return em, 0.0
    prec, rec = common / len(p), common / len(g)
    return em, 2 * prec * rec / (prec + rec)


def test_property_against_restatement():
    rng = random.Random(0)
    vocab = ["the", "a", "an", "The", "cat", "Cat!", "dog", "dog,", "x-y", "1990", "café", ".", "  ", "an.", "A"]
    for _ in range(3000):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 6)))
        gold = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 6)))
        em, f = _official_restated(pred, gold)
        assert exact_match(pred, gold) == em, (pred, gold)
        assert f1(pred, gold) == pytest.approx(f), (pred, gold)


def test_macro_and_micro():
    a = [Example(str(i), "", "", ["yes"]) for i in range(4)]
    b = [Example(f"b{i}", "", "", ["no"]) for i in range(1)]
    m = score_datasets({"0": "yes", "1": "yes", "b0": "nope"}, {"A": a, "B": b})
    assert m["datasets"]["A"]["exact_match"] == 50.0 and m["datasets"]["B"]["exact_match"] == 0.0
    assert m["macro"]["exact_match"] == 25.0 and m["micro"]["exact_match"] == pytest.approx(40.0)
    assert m["macro"]["total"] == m["micro"]["total"] == 5


def test_predictions_file_with_first_gold_answers(tmp_path, squad_path):
    exs = list(read_mrqa(squad_path))
    preds = {ex.qid: ex.answers[0] for ex in exs}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--predictions", str(tmp_path / "p.json"),
                        "--data", str(squad_path), "--metrics", str(tmp_path / "m.json")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["datasets"]["SQuAD"]["exact_match"] == 100.0 and m["datasets"]["SQuAD"]["total"] == 10570
    # F1 misses exactly the questions whose first gold answer normalises to nothing (the official rule)
    empty = sum(1 for ex in exs if not _official_restated(ex.answers[0], ex.answers[0])[1])
    assert empty > 0
    assert m["datasets"]["SQuAD"]["f1"] == pytest.approx(100 * (1 - empty / len(exs)))
    assert "SQuAD" in r.stdout and "macro average" in r.stdout


def test_bad_predictions_file_is_one_line(tmp_path, generated):
    (tmp_path / "p.json").write_text('{"a": 1}')
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--predictions", str(tmp_path / "p.json"),
                        "--data", str(generated["dev"])], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "p.json" in r.stderr, r.stderr
