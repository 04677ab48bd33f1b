"""From start/end logits over an example's windows to the best answer substring of its context.

The n-best search of google-research/bert `run_squad.py` (`write_predictions`) and transformers'
`postprocess_qa_predictions`, vectorised per window:
1. only context tokens may start or end an answer (question and special tokens are masked out);
2. take the n_best highest start logits and the n_best highest end logits;
3. every (start, end) pair with start <= end and at most max_answer_len tokens is a candidate with
   score start_logit + end_logit (the log of an unnormalised joint probability);
4. the best candidate over all windows wins; its tokens' char offsets give the exact context substring.
Because windows overlap, an answer near a border is seen whole in one window and cut in the other;
the cut one cannot reproduce its full span (its end token is missing), so the whole one wins when the
model scores it higher, and a span can never cross a window's border.
MRQA always has an answer; `allow_null` adds SQuAD 2.0's null answer, scored as the smallest
start[0] + end[0] (the <s> token) over the windows and chosen when it beats the best span.
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class Prediction:
    text: str
    score: float
    start: int  # char offsets into the context, end exclusive; (-1, -1) for the null answer
    end: int


def best_span_in_window(start_logits, end_logits, offsets, n_best=20, max_answer_len=30):
    """(score, token_start, token_end) of the best valid span of one window, or None if it has none."""
    is_context = offsets[:, 0] >= 0
    s = np.where(is_context, start_logits, -np.inf)
    e = np.where(is_context, end_logits, -np.inf)
    k = min(n_best, int(is_context.sum()))
    if k == 0:
        return None
    top_s = np.argpartition(-s, k - 1)[:k]  # (k,) indices of the k largest, unordered
    top_e = np.argpartition(-e, k - 1)[:k]
    length = top_e[None, :] - top_s[:, None] + 1  # (k, k): rows are starts, columns ends
    score = s[top_s][:, None] + e[top_e][None, :]  # (k, k)
    score = np.where((length >= 1) & (length <= max_answer_len), score, -np.inf)
    best = np.unravel_index(np.argmax(score), score.shape)
    if not np.isfinite(score[best]):
        return None
    return float(score[best]), int(top_s[best[0]]), int(top_e[best[1]])


def decode(examples, features, start_logits, end_logits, n_best=20, max_answer_len=30, allow_null=False) -> dict:
    """{qid: Prediction} for every example. start_logits[i] / end_logits[i] are the (unpadded) logits of
    features[i]; an example whose windows have no valid span gets the empty answer with score -inf."""
    best = {}  # example index -> (score, feature index, token start, token end)
    null = {}  # example index -> smallest null score over its windows
    for fi, f in enumerate(features):
        sl, el = np.asarray(start_logits[fi]), np.asarray(end_logits[fi])
        found = best_span_in_window(sl, el, f.offsets, n_best, max_answer_len)
        if found is not None and (f.example_index not in best or found[0] > best[f.example_index][0]):
            best[f.example_index] = (found[0], fi, found[1], found[2])
        null_score = float(sl[0] + el[0])
        null[f.example_index] = min(null.get(f.example_index, np.inf), null_score)
    out = {}
    for i, ex in enumerate(examples):
        if i not in best:
            out[ex.qid] = Prediction("", float("-inf"), -1, -1)
            continue
        score, fi, ts, te = best[i]
        if allow_null and null[i] > score:
            out[ex.qid] = Prediction("", null[i], -1, -1)
            continue
        a, b = int(features[fi].offsets[ts, 0]), int(features[fi].offsets[te, 1])
        out[ex.qid] = Prediction(ex.context[a:b], score, a, b)
    return out
