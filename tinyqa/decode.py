"""From start/end logits over an example's windows to answer substrings of its context: three decoders.

1. `decode` / `decode_nbest` (evaluate.py, training's eval): the n-best search of google-research/bert
   `run_squad.py` (`write_predictions`) and transformers' run_qa `postprocess_qa_predictions`, vectorised
   per window:
   a. only context tokens may start or end an answer (question and special tokens are masked out);
   b. take the n_best highest start logits and the n_best highest end logits;
   c. every (start, end) pair with start <= end and at most max_answer_len tokens is a candidate with
      score start_logit + end_logit (the log of an unnormalised joint probability);
   d. the best candidate over all windows wins; its tokens' char offsets give the exact context substring.
   Because windows overlap, an answer near a border is seen whole in one window and cut in the other;
   the cut one cannot reproduce its full span (its end token is missing), so the whole one wins when the
   model scores it higher, and a span can never cross a window's border.
   MRQA always has an answer; `handle_impossible_answer` adds SQuAD 2.0's null answer, scored as the smallest
   start[0] + end[0] (the <s> token) over the windows and chosen when it beats the best span by more than
   null_threshold (run_qa's null_score_diff_threshold: 0, or the checkpoint's calibration.json).

2. `answer_example` (the answer API, `QuestionAnswerer`): transformers' question-answering pipeline
   (4.x `pipelines/question_answering.py`, `select_starts_ends` / `decode_spans` / `postprocess`), whose
   score is a probability:
   a. per WINDOW, softmax the start logits and the end logits over that window's context tokens and its
      <s> token (the pipeline leaves <s> unmasked so that it can hold the null answer); each window is
      normalised on its own, so probabilities of different windows are not shares of one whole;
   b. a span's score is p_start * p_end, over spans with start <= end < start + max_answer_len;
   c. each window offers its k best spans (k = 2 * top_k + 10 with align_to_words, as some merge, else
      top_k); with align_to_words a span is widened to whole words (the tokenizer's pre-tokens);
   d. spans whose texts are equal ignoring case are ONE answer: the first seen (window order, then score)
      keeps its offsets and the later ones add their probability to it. So the same span found in two
      overlapping windows is listed once, and "Paris" twice in a context scores p1 + p2;
   e. with handle_impossible_answer, the null answer ("", offsets 0..0) scores the smallest
      p_start(<s>) * p_end(<s>) over the windows and is ranked among the others;
   f. the top_k answers by score, best first.
   Unlike the pipeline, only valid spans are returned: where a window has fewer valid spans than k, the
   pipeline fills its k with zero-probability pairs (end before start, or <s>), which can surface as
   empty or reversed answers with score 0 on tiny contexts.

The two decoders agree on one window (a softmax keeps the order of logit sums) up to (d)'s merging, (c)'s
word alignment and (1b)'s top-20 cut, but not across windows: each window is normalised on its own, and a
span seen by two windows adds up. So the two pick the same answer on nearly every single-window question
and often a different one across windows (docs/design.md counts both), and evaluate.py keeps run_qa's
decoder: its MRQA scores stay comparable with everyone else's.

3. `rank_documents` (`QuestionAnswerer.read`): one question over many documents, ranked as Haystack's
   ExtractiveReader ranks, rather than per window: every valid span of every window of every document is
   scored on its own, confidence = sigmoid((start + end logit - null - offset) / temperature) (the map
   tinyqa/calibration.py fits), so scores compare across documents and can be thresholded; spans of one
   document that overlap (the same answer seen by two overlapping windows, or "Oslo" inside "in Oslo") are
   one answer, the best; with no_answer, the null answer scores the probability that none of the top_k
   is right, prod(1 - confidence), and is ranked among them. A span's score is its logit sum above its
   window's null score (<s>), the anchor that makes windows comparable.

Worked example of (a)-(b): a window <s> q </s></s> c0 c1 </s> with start logits (2, ., ., ., 1, 3, .) over
<s>, c0, c1 gives p_start = softmax(2, 1, 3) = (.245, .090, .665); the span c1..c1 scores .665 * p_end(c1).
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class DecodeConfig:
    """How logits become answers. n_best is the run_qa decoder's (evaluate.py); top_k and align_to_words
    are the answer API's; max_answer_len and handle_impossible_answer are both's; null_threshold is run_qa's
    null_score_diff_threshold (the null answer wins when its score beats the best span's by more)."""
    n_best: int = 20  # start and end candidates per window (run_qa's n_best_size)
    max_answer_len: int = 30  # tokens (run_qa's default; the 4.x pipeline's was 15)
    handle_impossible_answer: bool = False  # SQuAD 2.0-style models only: MRQA questions always have an answer
    null_threshold: float = 0.0
    top_k: int = 1  # answers per question
    align_to_words: bool = True  # widen answers to whole words, as the pipeline does


@dataclass
class Answer:
    """One answer of the answer API. score is the QA pipeline's probability (see the module docstring);
    logit_score is start_logit + end_logit of the span (the run_qa decoder's score)."""
    text: str
    score: float
    start: int  # char offsets into the context, end exclusive; 0, 0 for the null answer (as the pipeline)
    end: int
    logit_score: float = 0.0
    confidence: float = 0.0  # calibrated: the probability that it is right (tinyqa/calibration.py)


@dataclass
class DocumentAnswer:
    """One answer of QuestionAnswerer.read: a span of one document, ranked among every document's."""
    text: str
    score: float  # calibrated confidence that this answer is right (tinyqa/calibration.py)
    document: object  # the document's id (its position when it came without one)
    start: int  # char offsets into that document, end exclusive; 0, 0 for the null answer
    end: int
    logit_score: float = 0.0  # start + end logit above its window's null score (what the confidence maps)


@dataclass
class Prediction:
    text: str
    score: float
    start: int  # char offsets into the context, end exclusive; (-1, -1) for the null answer
    end: int


def best_span_in_window(start_logits, end_logits, offsets, n_best=20, max_answer_len=30):
    """(score, token_start, token_end) of the best valid span of one window, or None if it has none."""
    scores, starts, ends = window_candidates(start_logits, end_logits, offsets, n_best, max_answer_len)
    if len(scores) == 0:
        return None
    return float(scores[0]), int(starts[0]), int(ends[0])


def decode(examples, features, start_logits, end_logits, n_best=20, max_answer_len=30, handle_impossible_answer=False,
           null_threshold=0.0) -> dict:
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
        if handle_impossible_answer and null[i] - score > null_threshold:
            out[ex.qid] = Prediction("", null[i], -1, -1)
            continue
        a, b = int(features[fi].offsets[ts, 0]), int(features[fi].offsets[te, 1])
        out[ex.qid] = Prediction(ex.context[a:b], score, a, b)
    return out


def window_candidates(start_logits, end_logits, offsets, n_best=20, max_answer_len=30):
    """The valid spans of one window among its n_best best starts x n_best best ends (context tokens
    only): (scores, token starts, token ends), best first; ties keep row-major order (np.argmax's pick)."""
    is_context = offsets[:, 0] >= 0
    s = np.where(is_context, start_logits, -np.inf)
    e = np.where(is_context, end_logits, -np.inf)
    k = min(n_best, int(is_context.sum()))
    if k == 0:
        return np.zeros(0), np.zeros(0, int), np.zeros(0, int)
    top_s = np.argpartition(-s, k - 1)[:k]  # (k,) indices of the k largest, unordered
    top_e = np.argpartition(-e, k - 1)[:k]
    length = top_e[None, :] - top_s[:, None] + 1  # (k, k): rows are starts, columns ends
    score = s[top_s][:, None] + e[top_e][None, :]  # (k, k)
    rows, cols = np.nonzero((length >= 1) & (length <= max_answer_len) & np.isfinite(score))
    order = np.argsort(-score[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    return score[rows, cols].astype(np.float64), top_s[rows], top_e[cols]


def decode_nbest(examples, features, start_logits, end_logits, n_best=20, max_answer_len=30,
                 handle_impossible_answer=False) -> dict:
    """{qid: [candidate]}: run_qa's nbest_predictions.json. Each candidate is a dict with text, start, end
    (char offsets, end exclusive), probability (softmax of the logit sums over this example's list),
    start_logit and end_logit; best first. As in run_qa, the list holds the n_best best candidates over
    all windows, plus the null answer (text "", offsets 0, 0) with handle_impossible_answer even when it ranks lower.
    Unlike run_qa, a char span found in two overlapping windows is listed once, with its best score;
    its first entry is always `decode`'s pick. An example with no valid span gets an empty list."""
    cands = {i: {} for i in range(len(examples))}  # example index -> {(a, b): (score, start_logit, end_logit)}
    null = {}  # example index -> (score, start_logit, end_logit) of the window with the smallest null score
    for fi, f in enumerate(features):
        sl, el = np.asarray(start_logits[fi], np.float64), np.asarray(end_logits[fi], np.float64)
        mine = cands[f.example_index]
        for score, ts, te in zip(*window_candidates(sl, el, f.offsets, n_best, max_answer_len)):
            key = (int(f.offsets[ts, 0]), int(f.offsets[te, 1]))
            if key not in mine or score > mine[key][0]:
                mine[key] = (float(score), float(sl[ts]), float(el[te]))
        if f.example_index not in null or sl[0] + el[0] < null[f.example_index][0]:
            null[f.example_index] = (float(sl[0] + el[0]), float(sl[0]), float(el[0]))
    out = {}
    for i, ex in enumerate(examples):
        ranked = sorted(cands[i].items(), key=lambda kv: -kv[1][0])
        items = [(ex.context[a:b], a, b, *v) for (a, b), v in ranked]
        if handle_impossible_answer and i in null:
            items.append(("", 0, 0, *null[i]))
            items.sort(key=lambda x: -x[3])  # stable: the null answer goes after spans of equal score
        top = items[:n_best]
        if handle_impossible_answer and i in null and not any(x[0] == "" and x[1] == x[2] == 0 for x in top):
            top.append(("", 0, 0, *null[i]))  # run_qa adds the null answer back when it ranks lower
        scores = np.array([x[3] for x in top])
        probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum() if len(top) else scores
        out[ex.qid] = [{"text": t, "start": a, "end": b, "probability": float(p), "start_logit": s_, "end_logit": e_}
                       for (t, a, b, _, s_, e_), p in zip(top, probs)]
    return out


# --- the answer API's decoder: the QA pipeline's probabilities

def window_probabilities(start_logits, end_logits, is_context):
    """Softmax of one window's start and end logits over its context tokens and <s> (index 0), in float64;
    every other token gets probability 0. The pipeline's `select_starts_ends` normalisation."""
    keep = is_context.copy()
    keep[0] = True
    out = []
    for x in (start_logits, end_logits):
        x = np.where(keep, np.asarray(x, np.float64), -np.inf)
        x = np.exp(x - x.max())
        out.append(x / x.sum())
    return out


def top_spans(p_start, p_end, is_context, k, max_answer_len):
    """The k most probable valid spans of one window: (probabilities, token starts, token ends), best first.
    Valid: both ends context tokens, start <= end < start + max_answer_len."""
    ctx = np.nonzero(is_context)[0]  # the context tokens are one contiguous run
    if len(ctx) == 0:
        return np.zeros(0), np.zeros(0, int), np.zeros(0, int)
    ps, pe = p_start[ctx], p_end[ctx]
    n = len(ctx)
    length = np.arange(n)[None, :] - np.arange(n)[:, None] + 1  # (n, n): rows are starts, columns ends
    score = np.where((length >= 1) & (length <= max_answer_len), ps[:, None] * pe[None, :], -1.0)  # (n, n)
    flat = score.ravel()
    k = min(k, int((flat >= 0).sum()))
    if k == 0:
        return np.zeros(0), np.zeros(0, int), np.zeros(0, int)
    idx = np.argpartition(-flat, k - 1)[:k] if k < len(flat) else np.arange(len(flat))
    idx = idx[np.lexsort((idx, -flat[idx]))]  # best first; ties: the earlier start, then end (np.argmax's pick)
    rows, cols = np.unravel_index(idx, score.shape)
    return flat[idx], ctx[rows], ctx[cols]


def char_span(offsets, words, ts, te, align_to_words):
    """Char offsets (a, b) of tokens ts..te of a window. With align_to_words, widened to the whole words
    that ts and te belong to, as far as those words lie in this window (the pipeline's word_to_chars on
    the window's own encoding). Worked example: context "Eiffel-Tower's", tokens "E"(0,1) "iff"(1,4)
    "el"(4,6) "-"(6,7) "T"(7,8) "ower"(8,12) "'s"(12,14) with words 0 0 0 1 2 2 3: the span "iff".."el"
    becomes "Eiffel" (0, 6), and "ower" alone becomes "Tower" (7, 12)."""
    if align_to_words and words is not None and words[ts] >= 0 and words[te] >= 0:
        ts = int(np.nonzero(words == words[ts])[0][0])
        te = int(np.nonzero(words == words[te])[0][-1])
    return int(offsets[ts, 0]), int(offsets[te, 1])


def answer_example(context, windows, top_k=1, max_answer_len=30, handle_impossible_answer=False,
                   align_to_words=True, calibration=None) -> list:
    """The top_k Answers of one question, best first, decoded as the QA pipeline does (module docstring).
    windows: (start_logits, end_logits, offsets, words) of each of its features, in context order. With a
    calibration, each answer's confidence is calibration.confidence of its span's score above its window's
    null score (the best of the windows it was found in); the null answer's, the chance that none is right."""
    k = 2 * top_k + 10 if align_to_words else top_k  # the pipeline's candidates per window
    answers, by_text = [], {}  # by_text: lower-cased text -> index into answers
    null = None  # (probability, logit score) of the window with the smallest null probability
    for start_logits, end_logits, offsets, words in windows:
        is_context = offsets[:, 0] >= 0
        p_start, p_end = window_probabilities(start_logits, end_logits, is_context)
        if null is None or p_start[0] * p_end[0] < null[0]:
            null = (float(p_start[0] * p_end[0]), float(start_logits[0] + end_logits[0]))
        for p, ts, te in zip(*top_spans(p_start, p_end, is_context, k, max_answer_len)):
            a, b = char_span(offsets, words, ts, te, align_to_words)
            text = context[a:b]
            logit = float(start_logits[ts] + end_logits[te])
            confidence = calibration.confidence(logit - float(start_logits[0] + end_logits[0])) if calibration else 0.0
            if text.lower() in by_text:
                answer = answers[by_text[text.lower()]]
                answer.score, answer.confidence = answer.score + float(p), max(answer.confidence, confidence)
            else:
                by_text[text.lower()] = len(answers)
                answers.append(Answer(text, float(p), a, b, logit, confidence))
    ranked = sorted(answers, key=lambda x: -x.score)[:top_k]  # stable: ties keep the order they were found
    if handle_impossible_answer and null is not None:
        answers.append(Answer("", null[0], 0, 0, null[1], float(np.prod([1 - x.confidence for x in ranked]))))
        ranked = sorted(answers, key=lambda x: -x.score)[:top_k]
    return ranked


# --- QuestionAnswerer.read's decoder: one ranking across documents

def rank_documents(texts, ids, windows, calibration, top_k=1, max_answer_len=30, n_best=20, no_answer=False,
                   align_to_words=True) -> list:
    """The top_k DocumentAnswers of one question over documents `texts` (their `ids`), best first.
    windows: (document index, start_logits, end_logits, offsets, words) of every window of every document;
    with align_to_words a span is widened to whole words (char_span), as the answer API does.
    Every window offers its n_best x n_best valid spans (run_qa's candidates), each scored by how far its
    logit sum stands above its window's null score (start_logit + end_logit of <s>: training labels a window
    without the answer there, so it is the window's own "no answer here", the anchor that makes scores of
    different windows comparable; raw logit sums drift from window to window). Taken best first, a span is
    kept unless it overlaps one already kept in the same document (non-maximum suppression: a span seen by
    two overlapping windows is kept once)."""
    candidates = []  # (logit score, document, char start, char end)
    for d, start_logits, end_logits, offsets, words in windows:
        scores, starts, ends = window_candidates(np.asarray(start_logits, np.float64),
                                                 np.asarray(end_logits, np.float64), offsets, n_best, max_answer_len)
        null = float(start_logits[0] + end_logits[0])
        candidates += [(float(sc) - null, d, *char_span(offsets, words, ts, te, align_to_words))
                       for sc, ts, te in zip(scores, starts, ends)]
    kept = []
    for score, d, a, b in sorted(candidates, key=lambda c: -c[0]):  # stable: ties keep window order
        if len(kept) == top_k:
            break
        if not any(d == d2 and a < b2 and a2 < b for _, d2, a2, b2 in kept):
            kept.append((score, d, a, b))
    answers = [DocumentAnswer(texts[d][a:b], calibration.confidence(s), ids[d], a, b, s) for s, d, a, b in kept]
    if no_answer:
        answers.append(DocumentAnswer("", float(np.prod([1 - x.score for x in answers])), None, 0, 0))
        answers.sort(key=lambda x: -x.score)  # stable: the null answer after spans of equal score
    return answers
