"""The official MRQA 2019 / SQuAD v1.1 metric: exact match and token F1, max over the gold answers.

Restates `mrqa_official_eval.py` (which is SQuAD v1.1's `evaluate-v1.1.py`):
- normalise: lower-case, drop punctuation, drop the articles a/an/the, squash whitespace;
- EM = normalised strings equal; F1 = harmonic mean of token precision and recall (bag of tokens);
  when the two share no token F1 is 0, even when both normalise to nothing (so a gold answer "." can
  give EM 1 but F1 0: the reason a perfect prediction file scores F1 slightly under 100);
- each question scores its max over the gold answers; an unanswered question scores 0;
- results are percentages. MRQA's headline number is the macro average over datasets.
SQuAD 2.0's official script (`evaluate-v2.0.py`) differs only where answers are empty: gold answers that
normalise to nothing are dropped, an unanswerable question's only gold answer is "", and F1 with an empty
side is 1 when both sides are empty, else 0. So an empty prediction scores EM = F1 = 1 on an unanswerable
question (`squad2=True`, and always for a question without gold answers).
"""
import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_squad2(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    return f1(prediction, gold)


def example_scores(prediction: str, answers: list, squad2=False) -> tuple:
    """(EM, F1) of one prediction, each the max over the gold answers (0 or 1, and 0..1)."""
    if squad2 or not answers:
        golds = [a for a in answers if normalize_answer(a)] or [""]
        return max(exact_match(prediction, g) for g in golds), max(f1_squad2(prediction, g) for g in golds)
    return max(exact_match(prediction, g) for g in answers), max(f1(prediction, g) for g in answers)


def score(predictions: dict, examples, squad2=False) -> dict:
    """{"exact_match", "f1", "total"} over the examples; predictions is {qid: answer text}."""
    em = f = 0.0
    for ex in examples:
        if ex.qid not in predictions:
            continue  # unanswered: counts 0
        e, g = example_scores(predictions[ex.qid], ex.answers, squad2)
        em, f = em + e, f + g
    n = len(examples)
    return {"exact_match": 100.0 * em / n if n else 0.0, "f1": 100.0 * f / n if n else 0.0, "total": n}


def score_datasets(predictions: dict, examples_by_dataset: dict, squad2=()) -> dict:
    """Per dataset, the macro average over datasets (MRQA's convention) and the micro average over questions.
    Datasets named in squad2 are scored by SQuAD 2.0's rules."""
    per = {name: score(predictions, exs, name in squad2) for name, exs in examples_by_dataset.items()}
    total = sum(r["total"] for r in per.values())
    macro = {k: sum(r[k] for r in per.values()) / len(per) if per else 0.0 for k in ("exact_match", "f1")}
    micro = {k: sum(r[k] * r["total"] for r in per.values()) / total if total else 0.0 for k in ("exact_match", "f1")}
    return {"datasets": per, "macro": {**macro, "total": total}, "micro": {**micro, "total": total}}
