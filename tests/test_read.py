"""QuestionAnswerer.read: one question over many documents, one ranking across them (tinyqa/decode.py's
rank_documents), against hand-built logits whose right answers are worked out here, and the real model
against itself document by document (a span's score does not depend on the other documents)."""
import math

import numpy as np
import pytest
from hermetic import tiny_checkpoint

from tinyqa import QuestionAnswerer, TinyQAError
from tinyqa.calibration import Calibration
from tinyqa.decode import rank_documents

# One window per document: <s> q </s> then the context's words, each word one token at these char offsets.
DOCS = ["Bob lives in Rome .", "Eve works in Paris .", "Ada was born in Oslo ."]


def window(doc, start_logit, end_logit, first=0, n_prefix=3):
    """A window over words[first:] of doc with every logit at -10 but the given {word index: logit}, and
    0 at <s> (a null score of 0, so that a span's score is its logit sum)."""
    words, offsets, at = doc.split(), [], 0
    for w in words:
        at = doc.index(w, at)
        offsets.append((at, at + len(w)))
        at += len(w)
    offsets = [(-1, -1)] * n_prefix + offsets[first:] + [(-1, -1)]
    s, e = np.full(len(offsets), -10.0), np.full(len(offsets), -10.0)
    s[0] = e[0] = 0.0
    for k, v in start_logit.items():
        s[n_prefix + k - first] = v
    for k, v in end_logit.items():
        e[n_prefix + k - first] = v
    return s, e, np.array(offsets), None


def test_answer_only_in_the_third_document():
    windows = [(0, *window(DOCS[0], {0: 1.0}, {0: 1.0})), (1, *window(DOCS[1], {3: 2.0}, {3: 2.0})),
               (2, *window(DOCS[2], {4: 9.0}, {4: 8.0}))]
    cal = Calibration(temperature=2.0, offset=5.0)
    best = rank_documents(DOCS, ["a", "b", "c"], windows, cal, top_k=3)
    assert [(x.text, x.document) for x in best] == [("Oslo", "c"), ("Paris", "b"), ("Bob", "a")]
    assert DOCS[2][best[0].start:best[0].end] == "Oslo" and best[0].logit_score == 17.0
    assert best[0].score == pytest.approx(1 / (1 + math.exp(-(17.0 - 5.0) / 2.0)))  # sigmoid((s - offset) / T)


def test_the_same_answer_in_two_documents_is_two_answers_ranked_by_score():
    docs = ["Ada was born in Oslo .", "Oslo is where Ada was born ."]
    windows = [(0, *window(docs[0], {4: 3.0}, {4: 3.0})), (1, *window(docs[1], {0: 5.0}, {0: 4.0}))]
    best = rank_documents(docs, [0, 1], windows, Calibration(), top_k=2)
    assert [(x.text, x.document, x.start) for x in best] == [("Oslo", 1, 0), ("Oslo", 0, 16)]


def test_a_span_seen_by_two_overlapping_windows_is_one_answer():
    """Windows [0, 5) and [2, 6) both hold "Oslo" (word 4): listed once, with the better window's score;
    "in Oslo" (words 3-4) overlaps it and is dropped; the next distinct span follows."""
    doc = DOCS[2]
    windows = [(0, *window(doc, {4: 6.0, 0: 1.0}, {4: 6.0, 0: 1.0})),
               (0, *window(doc, {4: 7.0, 3: 6.5}, {4: 7.0}, first=2))]
    best = rank_documents([doc], [0], windows, Calibration(), top_k=2)
    assert [(x.text, x.logit_score) for x in best] == [("Oslo", 14.0), ("Ada", 2.0)]  # not "in Oslo" (13.5)


def test_no_answer_scores_the_chance_that_none_is_right():
    windows = [(0, *window(DOCS[2], {4: 9.0, 0: 2.0}, {4: 8.0, 0: 2.0}))]
    cal = Calibration(temperature=3.0, offset=10.0)
    best = rank_documents([DOCS[2]], [7], windows, cal, top_k=2, no_answer=True)
    spans = [x for x in best if x.text]
    null = next(x for x in best if not x.text)
    assert null.document is None and null.score == pytest.approx((1 - spans[0].score) * (1 - spans[1].score))
    assert [x.score for x in best] == sorted((x.score for x in best), reverse=True)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    d = tmp_path_factory.mktemp("read-ckpt")
    rows = tiny_checkpoint(d)
    return QuestionAnswerer.from_pretrained(str(d)), rows


def test_read_ranks_as_each_document_read_alone_and_runs_one_pass(qa):
    """A span's score does not depend on the other documents, so reading them together ranks the union of
    reading each alone; every window goes through the model in one call."""
    qa, rows = qa
    docs = [{"id": f"d{i}", "text": r["context"]} for i, r in enumerate(rows[:6])]
    question = rows[2]["qas"][0]["question"]
    calls, runner = [], qa.runner
    qa.runner = lambda features: (calls.append(len(features)), runner(features))[1]
    try:
        together = qa.read(question, docs, top_k=5)
    finally:
        qa.runner = runner
    assert len(calls) == 1 and calls[0] >= len(docs)
    alone = sorted((a for d in docs for a in qa.read(question, [d], top_k=5)), key=lambda a: -a.logit_score)[:5]
    assert [(a.document, a.start, a.end) for a in together] == [(a.document, a.start, a.end) for a in alone]
    assert [a.logit_score for a in together] == pytest.approx([a.logit_score for a in alone], abs=1e-4)
    texts = {d["id"]: d["text"] for d in docs}
    assert all(texts[a.document][a.start:a.end] == a.text for a in together)


@pytest.mark.parametrize("documents,says", [
    ("one document", "list of strings"), ([], "no documents"), ([{"id": 1}], "missing field 'text'"),
    ([" "], "the text is empty"), ([{"text": "x", "id": [1]}], "'id' must be"), (["a b", "c \ud800"], "document 1"),
    ([{"text": "a", "id": "x"}, {"text": "b", "id": "x"}], "ids must be unique"),
])
def test_read_bad_documents(qa, documents, says):
    with pytest.raises(TinyQAError, match=says):
        qa[0].read("Who?", documents)
