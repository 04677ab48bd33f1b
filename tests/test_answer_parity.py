"""The answer API against transformers 4.x's question-answering pipeline (the oracle transformers 5 lacks).

The pipeline's outputs are recorded in tests/fixtures/pipeline_parity.json by make_pipeline_fixture.py
under a transformers<5 interpreter, for a seeded random RoBERTa (random_roberta.py) with the real RoBERTa
tokenizer. Here the same weights are rebuilt (their sha256 must match the fixture's) and every recorded
case is answered by tinyqa: texts and char offsets equal, scores within 1e-5.

When the fixture is absent, it is regenerated if TINYQA_TF4_PYTHON names a transformers<5 interpreter,
else the test skips (it never skips when the fixture is there).
"""
import gzip
import hashlib
import importlib.util
import json
import os
import subprocess

import pytest
from conftest import ROOT

from tinyqa import QuestionAnswerer
from tinyqa.features import FeaturizerConfig, featurize
from tinyqa.examples import Example

FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE = FIXTURES / "pipeline_parity.json"
_spec = importlib.util.spec_from_file_location("random_roberta", FIXTURES / "random_roberta.py")
random_roberta = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(random_roberta)


@pytest.fixture(scope="module")
def fixture(shared):
    if not FIXTURE.exists():
        tf4 = os.environ.get("TINYQA_TF4_PYTHON")
        if not tf4:
            pytest.skip(f"{FIXTURE.name} is absent and TINYQA_TF4_PYTHON names no transformers<5 interpreter "
                        "to regenerate it with")
        subprocess.run([tf4, str(FIXTURES / "make_pipeline_fixture.py"), "--shared", str(shared)], check=True)
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def qa(fixture, shared, tmp_path_factory):
    d = tmp_path_factory.mktemp("random-roberta")
    # the real RoBERTa tokenizer: the one the fixture was recorded with
    sha = random_roberta.write_checkpoint(d, shared / "roberta-tokenizer" / "tokenizer.json")
    assert sha == fixture["weights"]["sha256"], (
        "the rebuilt random weights differ from the ones the fixture was recorded with (torch's generator "
        "changed?): regenerate it with tests/fixtures/make_pipeline_fixture.py under transformers<5")
    return QuestionAnswerer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def squad_by_qid(squad_path):
    out = {}
    with gzip.open(squad_path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "header" not in row:
                out.update({qa["qid"]: (qa["question"], row["context"]) for qa in row["qas"]})
    return out


def case_pair(case, squad_by_qid):
    if case["source"] == "inline":
        return case["question"], case["context"]
    q, c = squad_by_qid[case["qid"]]
    assert hashlib.sha1((q + "\n" + c).encode()).hexdigest() == case["sha1"], f"SQuAD dev changed: {case['qid']}"
    return q, c


def test_answers_equal_the_pipeline(fixture, qa, squad_by_qid, shared):
    n_windows, n_answers, worst = [], 0, 0.0
    for case in fixture["cases"]:
        q, c = case_pair(case, squad_by_qid)
        opts = case["options"]
        got = qa.answer(q, c, **opts)
        got = got if isinstance(got, list) else [got]
        expected = case["expected"]
        # By design tinyqa returns only valid spans. Where a window has fewer valid spans than the
        # pipeline's k candidates (the two-token "tiny" context), the pipeline fills its list with
        # zero-probability pairs (an end before the start, or <s>) that come out as answers like "" or "Os"
        # with score 0.0; those are not answers, so they are left out of the comparison.
        if any(e["score"] == 0.0 for e in expected):
            assert case.get("name") == "tiny", case
            expected = [e for e in expected if e["score"] > 0.0]
        where = f"{case.get('qid') or case.get('name')} {opts}"
        assert len(got) == len(expected), f"{where}: {len(got)} answers, pipeline {len(expected)}"
        for g, e in zip(got, expected):
            assert (g.start, g.end) == (e["start"], e["end"]), f"{where}: {g} vs {e}"
            assert g.text == c[e["start"]:e["end"]] == e.get("answer", g.text), where
            assert g.score == pytest.approx(e["score"], abs=1e-5, rel=1e-4), f"{where}: {g.score} vs {e['score']}"
            worst = max(worst, abs(g.score - e["score"]))
            n_answers += 1
        if opts["max_seq_len"] == 96 and case["source"] == "squad":
            feats = featurize([Example("q", q, c, [])], qa.tokenizer, FeaturizerConfig(96, 32, 64), with_labels=False)
            n_windows.append(len(feats))
    # the cases cover what they claim: multi-window questions, several answers, the null answer
    assert max(n_windows) >= 4 and min(n_windows) >= 2
    assert n_answers > 300 and worst < 1e-5
    nulls = [c for c in fixture["cases"] if any(e["start"] == e["end"] == 0 and e["score"] > 0 for e in c["expected"])]
    assert nulls, "no case ranks the null answer among its top_k"


def test_single_window_cases_exist(fixture, qa, squad_by_qid):
    singles = 0
    for case in fixture["cases"]:
        if case["source"] == "squad" and case["options"]["max_seq_len"] == 384:
            q, c = case_pair(case, squad_by_qid)
            feats = featurize([Example("q", q, c, [])], qa.tokenizer, FeaturizerConfig(384, 128, 64), with_labels=False)
            singles += len(feats) == 1
    assert singles >= 10
