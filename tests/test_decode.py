"""Span decoding on hand-built logits whose best span is known."""
import numpy as np
import pytest

from tinyqa import load_tokenizer
from tinyqa.decode import best_span_in_window, decode
from tinyqa.features import Feature, FeaturizerConfig, featurize
from tinyqa.mrqa import Example

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
    assert decode([ex], [f], [s], [e], allow_null=True)["q"].text == ""


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
