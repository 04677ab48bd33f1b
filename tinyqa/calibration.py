"""Scores a user can threshold: an answer's confidence from its logit score, fitted on labelled data, and the
null-answer threshold of SQuAD 2.0-style models; stored beside the weights as calibration.json.

A span's score s is its logit sum (start_logit + end_logit) above its window's null score (the same sum at
<s> / [CLS], where training puts the label of a window that does not hold the answer): the window's own
"no answer here" is the anchor that makes spans of different windows and documents comparable, where raw
logit sums drift from window to window (Haystack's ExtractiveReader scores those; on small models they
carried no sign of being right at all). A monotone map of s is then a probability that means the same
everywhere, unlike the pipeline's per-window softmax:

    confidence(s) = sigmoid((s - offset) / temperature)

Uncalibrated, temperature 1 and offset 0: the model's own log-odds of this span against no answer.
`fit` chooses both on labelled data by maximum likelihood of "the top answer is right" (Platt scaling,
Platt 1999): a temperature alone, as FARMReader fitted for its softmax, cannot move the score at which
confidence is 0.5, and where a model's right answers start is the model's own.
`expected_calibration_error` measures how far confidence is from accuracy (Guo et al. 2017, "On
Calibration of Modern Neural Networks": equal-width bins, |accuracy - mean confidence| weighted by count).
`best_null_threshold` is SQuAD 2.0's official `find_best_thresh`: the null answer wins when its score beats
the best span's by more than the threshold (run_qa's null_score_diff_threshold), chosen to maximise F1.
"""
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from .errors import TinyQAError
from .files import read_json, write_json

FILE = "calibration.json"


@dataclass
class Calibration:
    temperature: float = 1.0
    offset: float = 0.0
    null_threshold: Optional[float] = None  # SQuAD 2.0-style models: null wins when null - best > this
    fitted_on: dict = field(default_factory=dict)  # what it was fitted on, and the ECE before and after

    def confidence(self, logit_score):
        """sigmoid((s - offset) / temperature), for a float or an array of them."""
        z = (np.asarray(logit_score, dtype=np.float64) - self.offset) / self.temperature
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))
        return float(p) if np.ndim(p) == 0 else p


def load(directory) -> Calibration:
    """The checkpoint's calibration.json, or the uncalibrated defaults when it has none."""
    path = os.path.join(directory, FILE)
    if not os.path.isfile(path):
        return Calibration()
    d = read_json(path, "the checkpoint's calibration")
    try:
        cal = Calibration(**d)
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 for v in (cal.temperature, cal.offset)) and cal.temperature > 0
        threshold = cal.null_threshold
        ok = ok and (threshold is None or (isinstance(threshold, (int, float)) and math.isfinite(threshold)))
    except TypeError as e:
        raise TinyQAError(f"{path}: not a calibration ({e}); run python -m tinyqa calibrate again, or delete it")
    if not ok:
        raise TinyQAError(f"{path}: temperature must be a positive number, offset and null_threshold numbers; "
                          "run python -m tinyqa calibrate again, or delete it")
    return cal


def save(directory, cal: Calibration):
    write_json(os.path.join(directory, FILE), asdict(cal), indent=2)


def fit(scores, correct, steps=100) -> tuple:
    """(temperature, offset) maximising the likelihood of `correct` (0/1) under sigmoid((s - offset) / T):
    a one-feature logistic regression, p = sigmoid(a s + c), solved by Newton's method (its log-likelihood
    is concave), then T = 1 / a and offset = -c / a. Needs both right and wrong answers among the data."""
    s, y = np.asarray(scores, np.float64), np.asarray(correct, np.float64)
    if len(s) < 2 or y.min() == y.max():
        raise TinyQAError(f"calibration needs both right and wrong top answers in the data ({int(y.sum())} of "
                          f"{len(y)} are right): give more, or other, labelled questions")
    x = np.stack([s, np.ones_like(s)], axis=1)  # (n, 2)
    w = np.array([0.1, 0.0])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -500, 500)))
        grad = x.T @ (y - p)
        hess = -(x.T * (p * (1 - p))) @ x - 1e-9 * np.eye(2)  # the ridge keeps it invertible when p saturates
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    if w[0] <= 0:
        raise TinyQAError("the data's right answers do not score higher than its wrong ones: this model's scores "
                          "carry no confidence to calibrate (is it trained?)")
    return 1 / w[0], -w[1] / w[0]


def expected_calibration_error(confidence, correct, bins=10) -> float:
    """sum over equal-width confidence bins of (bin's share of answers) x |its accuracy - its mean confidence|."""
    p, y = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(ece)


def reliability(confidence, correct, bins=10):
    """(bin centres, accuracy, mean confidence, count) per non-empty bin: the reliability diagram's bars."""
    p, y = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    rows = [((b + 0.5) / bins, y[which == b].mean(), p[which == b].mean(), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]
    return [np.array(col) for col in zip(*rows)] if rows else [np.zeros(0)] * 4


def best_null_threshold(null_minus_best, span_f1, has_answer) -> tuple:
    """(threshold, F1 in percent) of SQuAD 2.0's find_best_thresh: predicting null where null - best >
    threshold. null_minus_best: per question, the null score minus the best span's; span_f1: the best span's
    F1 (0..1); has_answer: whether the question is answerable. Candidates are the questions' own diffs."""
    diff = np.asarray(null_minus_best, np.float64)
    f1, ans = np.asarray(span_f1, np.float64), np.asarray(has_answer, bool)
    # With a threshold above every diff nothing is null: answerable questions score their span's F1,
    # unanswerable ones 0. Lowering it past each diff (largest first) turns that question null.
    score = float(np.where(ans, f1, 0.0).sum())
    best_score, best_t = score, float(diff.max()) if len(diff) else 0.0
    for i in np.argsort(-diff, kind="stable"):
        score += (0.0 - f1[i]) if ans[i] else 1.0
        if score > best_score:
            best_score, best_t = score, float(diff[i]) - 1e-6
    return best_t, 100.0 * best_score / max(len(diff), 1)
