"""Span decoding on hand-built logits whose best span is known."""
import numpy as np
import pytest

from tinyqa import load_tokenizer
from tinyqa.decode import best_span_in_window, decode
from tinyqa.features import Feature, FeaturizerConfig, featurize
from tinyqa.examples import Example

NEG = -10.0


def feature(n_prefix, ctx_offsets, example_index=0):
    """A window whose first n_prefix tokens are question/special, then context tokens, then </s>."""
    off = np.array([[-1, -1]] * n_prefix + list(ctx_offsets) + [[-1, -1]], dtype=np.int32)
    return Feature(np.zeros(len(off), np.int32), off, example_index)


def logits(n, **points):
    x = np.full(n, NEG, dtype=np.float32)
    for i, v in points.items():
        x[int(i[1:])] = v
    return x


def test_best_span_ignores_question_tokens_reversed_and_long_spans():
    # context "aa bb cc dd": tokens at 3..6 after a 3-token prefix
    f = feature(3, [[0, 2], [3, 5], [6, 8], [9, 11]])
    s = logits(8, t1=9.0, t4=5.0, t6=1.0)  # t1 is a question token: must be ignored
    e = logits(8, t3=8.0, t5=4.0)  # t3 is before the best start t4: end < start is invalid
    assert best_span_in_window(s, e, f.offsets)[1:] == (4, 5)
    # max_answer_len: the 3-token span 4..6 scores best but only 2 tokens are allowed
    # (candidates with 2 tokens at most: (4,4) = 5.5, (5,6) = 0.0, (4,5) = 5 - 10)
    s, e = logits(8, t4=5.0, t5=-5.0), logits(8, t6=5.0, t4=0.5)
    assert best_span_in_window(s, e, f.offsets, max_answer_len=3)[1:] == (4, 6)
    assert best_span_in_window(s, e, f.offsets, max_answer_len=2)[1:] == (4, 4)
    assert best_span_in_window(s, e, f.offsets, max_answer_len=2)[0] == pytest.approx(5.0 + 0.5)


def test_answer_in_the_overlap_and_never_across_a_border():
    context = "w0 w1 w2 w3 w4 w5"
    off = [[3 * i, 3 * i + 2] for i in range(6)]
    ex = Example("q", "?", context, ["w3 w4"])
    # window A holds w0..w3, window B holds w2..w5 (overlap w2, w3); 1-token prefix
    fa, fb = feature(1, off[0:4]), feature(1, off[2:6])
    # A: strongest start at w3 (its last context token), but its end w4 lies beyond A's border
    sa, ea = logits(6, t4=9.0, t1=0.0), logits(6, t1=0.0)
    # B: w3..w4 with a lower but valid score
    sb, eb = logits(6, t2=3.0), logits(6, t3=3.0)
    pred = decode([ex], [fa, fb], [sa, sb], [ea, eb])["q"]
    assert pred.text == "w3 w4" and pred.score == pytest.approx(6.0) and (pred.start, pred.end) == (9, 14)
    # the same answer in the overlap found in both windows: the higher-scoring window wins
    sa2, ea2 = logits(6, t3=2.0), logits(6, t4=2.0)  # A sees w2..w3 at 4.0; B sees w3..w4 at 6.0
    assert decode([ex], [fa, fb], [sa2, sb], [ea2, eb])["q"].text == "w3 w4"
    sa3, ea3 = logits(6, t3=5.0), logits(6, t4=5.0)  # now A's w2..w3 (10.0) beats B
    assert decode([ex], [fa, fb], [sa3, sb], [ea3, eb])["q"].text == "w2 w3"


def test_null_answer_only_when_allowed():
    ex = Example("q", "?", "aa bb", ["aa"])
    f = feature(2, [[0, 2], [3, 5]])
    s, e = logits(5, t0=6.0, t2=1.0), logits(5, t0=6.0, t3=1.0)
    assert decode([ex], [f], [s], [e])["q"].text == "aa bb"
    assert decode([ex], [f], [s], [e], handle_impossible_answer=True)["q"].text == ""


@pytest.mark.parametrize("context,answer", [
    ("Der Bürgermeister von Köln heißt Renée Ångström-Ørsted und wohnt dort.", "Renée Ångström-Ørsted"),
    ("北京是中华人民共和国的首都，位于华北平原。", "中华人民共和国"),
    ("The party 🎉🎉 was hosted by José 😀 Núñez in Zürich.", "José 😀 Núñez"),
])
def test_unicode_offsets_give_the_exact_substring(tokenizer_dir, context, answer):
    tok = load_tokenizer(str(tokenizer_dir))
    a = context.index(answer)
    ex = Example("q", "Who?", context, [answer], (a, a + len(answer)))
    (f,) = featurize([ex], tok, FeaturizerConfig())
    n = len(f.input_ids)
    s, e = np.full(n, NEG, np.float32), np.full(n, NEG, np.float32)
    s[f.start_label], e[f.end_label] = 5.0, 5.0  # point the logits at the labelled tokens
    pred = decode([ex], [f], [s], [e])["q"]
    assert pred.text == answer and context[pred.start:pred.end] == answer


def test_long_context_windows_with_real_tokenizer(tokenizer_dir):
    """An answer deep in a long context, seen by a later window only, maps back to the right characters."""
    tok = load_tokenizer(str(tokenizer_dir))
    filler = " ".join(f"Sentence {i} is filler text about nothing." for i in range(150))
    context = filler + " The treasure is buried under the old oak tree. " + filler
    answer = "under the old oak tree"
    a = context.index(answer)
    ex = Example("q", "Where is the treasure?", context, [answer], (a, a + len(answer)))
    feats = featurize([ex], tok, FeaturizerConfig(max_seq_len=128, doc_stride=32))
    assert len(feats) > 20
    holders = [i for i, f in enumerate(feats) if f.start_label]
    assert holders
    S = [np.full(len(f.input_ids), NEG, np.float32) for f in feats]
    E = [np.full(len(f.input_ids), NEG, np.float32) for f in feats]
    k = holders[-1]
    S[k][feats[k].start_label], E[k][feats[k].end_label] = 4.0, 4.0
    assert decode([ex], feats, S, E)["q"].text == answer


# --- the answer API's decoder (the QA pipeline's probabilities), against hand-computed values

def softmax(xs):
    import math
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_pipeline_probabilities_by_hand():
    from tinyqa.decode import answer_example
    context = "aa bb cc"
    off = np.array([[-1, -1], [-1, -1], [-1, -1], [0, 2], [3, 5], [6, 8], [-1, -1]], np.int32)  # <s> q </s> aa bb cc </s>
    words = np.array([-1, -1, -1, 0, 1, 2, -1], np.int32)
    s = np.array([1.0, 9.0, 9.0, 2.0, 0.5, -1.0, 9.0])  # the 9s are question/special tokens: not in the softmax
    e = np.array([1.5, 9.0, 9.0, -2.0, 1.0, 0.0, 9.0])
    ps, pe = softmax([1.0, 2.0, 0.5, -1.0]), softmax([1.5, -2.0, 1.0, 0.0])  # over <s>, aa, bb, cc
    # spans (start <= end, at most 2 tokens): aa..aa, aa..bb, bb..bb, bb..cc, cc..cc
    want = sorted([("aa", ps[1] * pe[1]), ("aa bb", ps[1] * pe[2]), ("bb", ps[2] * pe[2]),
                   ("bb cc", ps[2] * pe[3]), ("cc", ps[3] * pe[3])], key=lambda x: -x[1])
    got = answer_example(context, [(s, e, off, words)], top_k=10, max_answer_len=2)
    assert [a.text for a in got] == [t for t, _ in want]
    assert [a.score for a in got] == pytest.approx([p for _, p in want], rel=1e-12)
    assert got[0].logit_score == pytest.approx(2.0 + 1.0)  # aa..bb
    # the null answer: p_start(<s>) * p_end(<s>), ranked among the spans
    got = answer_example(context, [(s, e, off, words)], top_k=10, max_answer_len=2, handle_impossible_answer=True)
    null = [a for a in got if a.text == ""]
    assert len(null) == 1 and (null[0].start, null[0].end) == (0, 0)
    assert null[0].score == pytest.approx(ps[0] * pe[0]) and null[0].logit_score == pytest.approx(2.5)
    assert [a.score for a in got] == sorted([a.score for a in got], reverse=True)


def test_pipeline_merges_equal_texts_across_windows_and_case():
    """One answer per text (ignoring case): the first seen keeps its offsets, later ones add their probability.
    Two windows, each normalised on its own, both see "Paris"; window B also sees "PARIS" elsewhere."""
    from tinyqa.decode import answer_example
    context = "Paris x PARIS"  # Paris (0, 5), x (6, 7), PARIS (8, 13)
    off_a = np.array([[-1, -1], [-1, -1], [0, 5], [6, 7], [-1, -1]], np.int32)
    off_b = np.array([[-1, -1], [-1, -1], [6, 7], [8, 13], [-1, -1]], np.int32)
    w_a, w_b = np.array([-1, -1, 0, 1, -1]), np.array([-1, -1, 1, 2, -1])
    s_a, e_a = np.array([0.0, 5, 3, 0, 5]), np.array([0.0, 5, 3, 0, 5])
    s_b, e_b = np.array([0.0, 5, 0, 2, 5]), np.array([0.0, 5, 0, 2, 5])
    pa, pb = softmax([0.0, 3.0, 0.0]), softmax([0.0, 0.0, 2.0])  # <s>, first, second context token
    got = answer_example(context, [(s_a, e_a, off_a, w_a), (s_b, e_b, off_b, w_b)], top_k=5, max_answer_len=1)
    by_text = {a.text: a for a in got}
    assert set(by_text) == {"Paris", "x"}  # PARIS merged into Paris; x seen in both windows merged too
    assert (by_text["Paris"].start, by_text["Paris"].end) == (0, 5)
    assert by_text["Paris"].score == pytest.approx(pa[1] ** 2 + pb[2] ** 2)
    assert by_text["x"].score == pytest.approx(pa[2] ** 2 + pb[1] ** 2)


def test_align_to_words_widens_to_whole_words_in_the_window():
    from tinyqa.decode import char_span
    # "Eiffel-Tower's": E iff el - T ower 's, words 0 0 0 1 2 2 3, after a 2-token prefix
    off = np.array([[-1, -1], [-1, -1], [0, 1], [1, 4], [4, 6], [6, 7], [7, 8], [8, 12], [12, 14], [-1, -1]])
    words = np.array([-1, -1, 0, 0, 0, 1, 2, 2, 3, -1])
    assert char_span(off, words, 3, 4, True) == (0, 6)  # "iff".."el" -> "Eiffel"
    assert char_span(off, words, 7, 7, True) == (7, 12)  # "ower" -> "Tower"
    assert char_span(off, words, 3, 4, False) == (1, 6)
    # a word cut by the window's border widens only as far as the window reaches (as the pipeline's
    # word_to_chars on the window's own encoding): here the window starts at "iff"
    assert char_span(off[[0, 1, 3, 4, 5]], words[[0, 1, 3, 4, 5]], 2, 2, True) == (1, 6)


def run_qa_nbest_reference(context, windows, n_best, max_answer_len, null):
    """transformers' run_qa postprocess_qa_predictions, written as its loops (on context-masked logits,
    tinyqa's convention), with one change: a char span is kept once, at its best score."""
    import math
    prelim, min_null = {}, None
    for s, e, off in windows:
        ctx = [i for i in range(len(off)) if off[i][0] >= 0]
        if min_null is None or s[0] + e[0] < min_null[0]:
            min_null = (s[0] + e[0], s[0], e[0])
        starts = sorted(ctx, key=lambda i: -s[i])[:n_best]
        ends = sorted(ctx, key=lambda i: -e[i])[:n_best]
        for a in starts:
            for b in ends:
                if b < a or b - a + 1 > max_answer_len:
                    continue
                key = (int(off[a][0]), int(off[b][1]))
                if key not in prelim or s[a] + e[b] > prelim[key][0]:
                    prelim[key] = (s[a] + e[b], s[a], e[b])
    preds = [(context[k[0]:k[1]], k, *v) for k, v in prelim.items()]
    if null:
        preds.append(("", (0, 0), *min_null))
    preds = sorted(preds, key=lambda p: -p[2])[:n_best]
    if null and not any(p[1] == (0, 0) and p[0] == "" for p in preds):
        preds.append(("", (0, 0), *min_null))
    z = [math.exp(p[2] - max(q[2] for q in preds)) for p in preds]
    return [(p[0], p[1], zi / sum(z), p[3], p[4]) for p, zi in zip(preds, z)]


@pytest.mark.parametrize("handle_impossible_answer", [False, True])
def test_nbest_equals_run_qa_reference_and_decode(handle_impossible_answer):
    from tinyqa.decode import decode_nbest
    rng = np.random.default_rng(0)
    context = " ".join(f"w{i}" for i in range(40))
    off = [[context.index(f"w{i} ") if i < 39 else context.rindex("w39"), 0] for i in range(40)]
    off = [[a, a + len(f"w{i}")] for i, (a, _) in enumerate(off)]
    ex = Example("q", "?", context, ["w1"])
    feats, S, E, wins = [], [], [], []
    for lo, hi in ((0, 24), (16, 40)):  # two overlapping windows, a 2-token prefix each
        f = feature(2, off[lo:hi])
        s, e = rng.normal(0, 2, len(f.offsets)), rng.normal(0, 2, len(f.offsets))
        feats.append(f), S.append(s), E.append(e), wins.append((s, e, f.offsets))
    got = decode_nbest([ex], feats, S, E, n_best=7, max_answer_len=5, handle_impossible_answer=handle_impossible_answer)["q"]
    want = run_qa_nbest_reference(context, wins, 7, 5, handle_impossible_answer)
    assert [(g["text"], (g["start"], g["end"])) for g in got] == [(w[0], w[1]) for w in want]
    assert [g["probability"] for g in got] == pytest.approx([w[2] for w in want])
    # flattened: pytest 9.2's approx takes no nested tuples
    assert [x for g in got for x in (g["start_logit"], g["end_logit"])] == pytest.approx([x for w in want
                                                                                           for x in (w[3], w[4])])
    assert sum(g["probability"] for g in got) == pytest.approx(1.0)
    best = decode([ex], feats, S, E, n_best=7, max_answer_len=5, handle_impossible_answer=handle_impossible_answer)["q"]
    assert got[0]["text"] == best.text
