"""evaluate.py's extra outputs and inputs: --nbest, --per-question, the model card's row, SQuAD JSON (v1.1, v2.0)."""
import gzip
import importlib.util
import json
import re
import string
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT

from tinyqa import EncoderConfig, EncoderForQA, load_tokenizer, save_pretrained
from tinyqa.data import read_examples

# evaluate.py, loaded by path: a plain `import evaluate` could find Hugging Face's `evaluate` package
_spec = importlib.util.spec_from_file_location("tinyqa_evaluate_script", ROOT / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory, best_tokenizer_dir):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_pretrained(EncoderForQA(EncoderConfig(**SMALL)), d, tokenizer=load_tokenizer(str(best_tokenizer_dir)))
    return d


def run_evaluate(*args):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r


def mrqa_rows(path, n_questions):
    """The first context lines of an MRQA file holding n_questions questions (read with plain json)."""
    rows, n = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "header" in row:
                continue
            rows.append(row)
            n += len(row["qas"])
            if n >= n_questions:
                return rows
    return rows


def to_squad(rows, version="1.1", impossible=()):
    """SQuAD JSON of MRQA rows: answers from detected_answers, whose char_spans ends are inclusive
    (SQuAD's answer_start + len(text) is exclusive). Questions in `impossible` become v2.0 unanswerable."""
    paragraphs = []
    for row in rows:
        qas = []
        for qa in row["qas"]:
            if qa["qid"] in impossible:
                qas.append({"id": qa["qid"], "question": qa["question"], "answers": [], "is_impossible": True})
                continue
            answers = [{"text": row["context"][s:e + 1], "answer_start": s}
                       for det in qa["detected_answers"] for s, e in det["char_spans"]]
            qas.append({"id": qa["qid"], "question": qa["question"], "answers": answers,
                        **({"is_impossible": False} if version == "v2.0" else {})})
        paragraphs.append({"context": row["context"], "qas": qas})
    return {"version": version, "data": [{"title": "t", "paragraphs": paragraphs}]}


def test_squad_v11_json_reads_as_the_same_examples_and_predictions(squad_path, random_checkpoint, tmp_path):
    rows = mrqa_rows(squad_path, 60)
    squad = tmp_path / "dev-v1.1.json"
    squad.write_text(json.dumps(to_squad(rows)))
    mrqa = tmp_path / "dev.jsonl"
    mrqa.write_text("\n".join(json.dumps(r) for r in rows))
    a, b = list(read_examples(squad)), list(read_examples(mrqa))
    assert [(x.qid, x.question, x.context, x.span) for x in a] == [(x.qid, x.question, x.context, x.span) for x in b]
    for ex in a:
        assert ex.context[ex.span[0]:ex.span[1]] == ex.answers[0] and ex.dataset == "dev-v1.1"
    run_evaluate("--model", random_checkpoint, "--data", squad, "--output", tmp_path / "p1.json")
    run_evaluate("--model", random_checkpoint, "--data", mrqa, "--output", tmp_path / "p2.json")
    assert json.loads((tmp_path / "p1.json").read_text()) == json.loads((tmp_path / "p2.json").read_text())


# SQuAD 2.0's official evaluate-v2.0.py, restated as the oracle (compute_exact, compute_f1, get_raw_scores).
def _norm(s):
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _f1(gold, pred):
    g, p = _norm(gold).split(), _norm(pred).split()
    if not g or not p:
        return int(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if same == 0:
        return 0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def squad2_official(dataset, preds):
    em = f1 = n = 0
    for article in dataset["data"]:
        for par in article["paragraphs"]:
            for qa in par["qas"]:
                golds = [a["text"] for a in qa["answers"] if _norm(a["text"])] or [""]
                p = preds[qa["id"]]
                em += max(int(_norm(g) == _norm(p)) for g in golds)
                f1 += max(_f1(g, p) for g in golds)
                n += 1
    return 100 * em / n, 100 * f1 / n, n


def test_squad_v2_unanswerable_questions_follow_the_official_rules(squad_path, tmp_path):
    rows = mrqa_rows(squad_path, 40)
    qids = [qa["qid"] for r in rows for qa in r["qas"]]
    impossible = set(qids[::3])
    doc = to_squad(rows, "v2.0", impossible)
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(doc))
    # predictions: right, partly right and wrong answers; "" on some unanswerable and some answerable questions
    preds = {}
    for i, (r, qa) in enumerate((r, qa) for r in rows for qa in r["qas"]):
        gold = qa["detected_answers"][0]["text"]
        preds[qa["qid"]] = ["", gold, gold.split()[0], "nothing like it", r["context"][:15]][i % 5]
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    r = run_evaluate("--predictions", tmp_path / "preds.json", "--data", path, "--handle-impossible-answer",
                     "--metrics", tmp_path / "m.json", "--per-question", tmp_path / "q.jsonl")
    m = json.loads((tmp_path / "m.json").read_text())["datasets"]["dev-v2.0"]
    em, f1, n = squad2_official(doc, preds)
    assert m["total"] == n == len(qids) and m["exact_match"] == pytest.approx(em) and m["f1"] == pytest.approx(f1)
    lines = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [x["qid"] for x in lines] == qids
    for x in lines:
        if x["qid"] in impossible:
            assert x["answers"] == [] and x["exact_match"] == x["f1"] == float(x["prediction"] == "")
    # without --handle-impossible-answer the unanswerable questions are left out, and said so
    r = run_evaluate("--predictions", tmp_path / "preds.json", "--data", path, "--metrics", tmp_path / "m2.json")
    assert f"{len(impossible)} unanswerable question(s) left out" in r.stderr and "--handle-impossible-answer" in r.stderr
    assert json.loads((tmp_path / "m2.json").read_text())["macro"]["total"] == len(qids) - len(impossible)


def test_nbest_and_per_question(squad_path, random_checkpoint, tmp_path):
    out, nb, pq, met = (tmp_path / n for n in ("p.json", "nbest.json", "q.jsonl", "m.json"))
    run_evaluate("--model", random_checkpoint, "--data", squad_path, "--limit", "50", "--n-best", "7",
                 "--max-seq-len", "128", "--doc-stride", "32",
                 "--output", out, "--nbest", nb, "--per-question", pq, "--metrics", met)
    preds, nbest = json.loads(out.read_text()), json.loads(nb.read_text())
    exs = {ex.qid: ex for _, ex in zip(range(50), read_examples(squad_path))}
    assert set(nbest) == set(preds) == set(exs)
    for qid, cands in nbest.items():
        assert 1 <= len(cands) <= 7 and cands[0]["text"] == preds[qid]
        assert sum(c["probability"] for c in cands) == pytest.approx(1.0)
        scores = [c["start_logit"] + c["end_logit"] for c in cands]
        assert scores == sorted(scores, reverse=True)
        assert [c["probability"] for c in cands] == sorted([c["probability"] for c in cands], reverse=True)
        for c in cands:
            assert c["text"] == exs[qid].context[c["start"]:c["end"]] and c["text"]
        assert len({(c["start"], c["end"]) for c in cands}) == len(cands)
    lines = [json.loads(x) for x in pq.read_text().splitlines()]
    assert [x["qid"] for x in lines] == list(exs)
    for x in lines:
        ex = exs[x["qid"]]
        assert (x["dataset"], x["question"], x["answers"], x["prediction"]) == ("SQuAD", ex.question, ex.answers,
                                                                                preds[ex.qid])
    m = json.loads(met.read_text())["datasets"]["SQuAD"]
    assert 100 * sum(x["exact_match"] for x in lines) / 50 == pytest.approx(m["exact_match"])
    assert 100 * sum(x["f1"] for x in lines) / 50 == pytest.approx(m["f1"])
    assert "card" not in json.loads(met.read_text())  # a local checkpoint has no card


def test_card_row_only_for_a_known_model_on_a_whole_official_split(capsys):
    from tinyqa.catalog import SPLITS
    for split, (em, f1) in (("dev", (69.38, 80.07)), ("test", (53.29, 64.16))):
        per = {name: {"exact_match": 50.0, "f1": 60.0, "total": n} for (s, name), (_, _, n) in SPLITS.items() if s == split}
        metrics = {"datasets": per, "macro": {"exact_match": 50.0, "f1": 60.0, "total": 1},
                   "micro": {"exact_match": 50.0, "f1": 60.0, "total": 1}}
        for model in ("tinyroberta-mrqa", "VMware/tinyroberta-mrqa"):
            m = dict(metrics)
            evaluate.add_card_scores(m, model)
            assert m["card"] == {"hub_id": "VMware/tinyroberta-mrqa", "split": split, "exact_match": em, "f1": f1}
        evaluate.print_table(m)
        assert re.search(rf"model card \(macro\)\s+{em:.2f}\s+{f1:.2f}\s+VMware/tinyroberta-mrqa, {split}",
                         capsys.readouterr().out)
        for model, change in (("runs/mine", None), ("tinyroberta-mrqa", "SQuAD")):
            m = json.loads(json.dumps(metrics))
            if change:  # --limit or a partial file: not the card's data
                next(iter(m["datasets"].values()))["total"] -= 1
            evaluate.add_card_scores(m, model)
            assert "card" not in m


def test_squad_reader_names_bad_questions_and_reads_gzip(tmp_path):
    from tinyqa.errors import TinyQAError
    from tinyqa.examples import ReadReport
    from tinyqa.data import stream_files
    ctx = "Ada Lovelace wrote the first program in 1843."
    doc = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "a", "question": "Who?", "answers": [{"text": "Ada Lovelace", "answer_start": 0}]},
        {"id": "b", "question": "When?", "answers": [{"text": "1843", "answer_start": 3}]},  # not at 3
        {"id": "c", "question": "What?", "answers": [{"text": "the first program", "answer_start": 19}]}]}]}]}
    path = tmp_path / "bad.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)  # pretty-printed and gzipped: still recognised
    with pytest.raises(TinyQAError, match=r"data\[0\]\.paragraphs\[0\]\.qas\[1\]: \(id b\) answers\[0\] '1843' is "
                                          r"not at answer_start 3.*--skip-bad"):
        list(read_examples(path))
    report = ReadReport()
    got = list(read_examples(path, skip_bad=True, report=report))
    assert [(ex.qid, ex.span) for ex in got] == [("a", (0, 12)), ("c", (19, 36))] and len(report.skipped) == 1
    assert ctx[19:36] == "the first program"
    # the training scripts' reader (the feature store's stream) takes it too
    assert [ex.qid for _, ex in stream_files([str(path)], skip_bad=True)] == ["a", "c"]
