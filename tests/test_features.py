"""Sliding windows and labels on a whole dev set, against transformers' tokenizer windows: the generated one
(see conftest.py) and, where ../shared/data is there, SQuAD dev with the real RoBERTa tokenizer."""
import numpy as np
import pytest

from tinyqa import load_tokenizer
from tinyqa.features import FeaturizerConfig, collate, featurize, window_ranges
from tinyqa.mrqa import read_mrqa


@pytest.fixture(scope="module")
def squad(mrqa_path, tokenizer_dir):
    exs = list(read_mrqa(mrqa_path))
    tok = load_tokenizer(str(tokenizer_dir))
    return exs, tok, featurize(exs, tok)


def test_windows_worked_example():
    """The module docstring's example (n 700, budget 360, doc_stride 128), a context that fits and an empty
    one, all in one call: windows come out context by context."""
    start, stop, owner = window_ranges([700, 100, 0], [360, 360, 360], 128)
    assert list(zip(owner.tolist(), start.tolist(), stop.tolist())) == [
        (0, 0, 360), (0, 232, 592), (0, 464, 700), (1, 0, 100), (2, 0, 0)]


def test_window_ranges_equal_the_sliding_loop():
    """Oracle: the loop the ranges are defined by (run_squad.py's): a window at 0, the next one step =
    budget - doc_stride further on, until a window reaches the context's end."""
    rng = np.random.default_rng(0)
    n, budget = rng.integers(0, 900, 300), rng.integers(40, 380, 300)
    stride = 32
    expected = []
    for k in range(300):
        start = 0
        while True:
            expected.append((k, start, min(start + int(budget[k]), int(n[k]))))
            if start + budget[k] >= n[k]:
                break
            start += int(budget[k]) - stride
    start, stop, owner = window_ranges(n, budget, stride)
    assert list(zip(owner.tolist(), start.tolist(), stop.tolist())) == expected
    with pytest.raises(Exception, match="doc_stride=32"):
        window_ranges([10], [32], 32)


def test_labels_reproduce_the_answer(squad):
    exs, _, feats = squad
    labelled = [f for f in feats if f.start_label != 0]
    assert len(labelled) > 0.94 * len(exs)  # nearly every answer lies wholly inside some window
    exact = 0
    for f in labelled:
        ex = exs[f.example_index]
        a, b = ex.span
        (s0, s1), (e0, e1) = f.offsets[f.start_label], f.offsets[f.end_label]
        assert f.start_label <= f.end_label and s0 >= 0 and e0 >= 0
        if ex.context[s0:e1].strip() == ex.context[a:b].strip():
            exact += 1
        else:
            # The answer starts or ends inside a BPE token (e.g. "Mutants" + ")." in one token): then the
            # label must be the smallest token span that covers it.
            assert s0 <= a < s1 and e0 < b <= e1, (ex.qid, ex.context[s0:e1], ex.context[a:b])
    assert exact / len(labelled) > 0.98, exact / len(labelled)
    # an answer not wholly inside a window is labelled <s> (0) in that window
    for f in feats:
        if f.start_label == 0:
            a, b = exs[f.example_index].span
            ctx = f.offsets[f.offsets[:, 0] >= 0]
            assert not (ctx[0, 0] <= a and ctx[-1, 1] >= b)


def test_windows_cover_every_context_character(squad):
    exs, _, feats = squad
    covered = {}
    for f in feats:
        c = covered.setdefault(f.example_index, np.zeros(len(exs[f.example_index].context), bool))
        for s, e in f.offsets[f.offsets[:, 0] >= 0]:
            c[s:e] = True
    for i, ex in enumerate(exs):
        missing = [j for j, ch in enumerate(ex.context) if not covered[i][j] and not ch.isspace()]
        assert not missing, (ex.qid, missing[:5])
    assert max(len(f.input_ids) for f in feats) == 384


def test_same_windows_as_transformers_tokenizer(squad, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    exs, tok, feats = squad
    hf = transformers.RobertaTokenizerFast.from_pretrained(str(tokenizer_dir))  # from vocab.json + merges.txt
    assert len({f.example_index for f in feats if len(f.input_ids) == 384}) > 10  # several windows per context
    # tinyqa also cuts questions to max_question_len (64) tokens, which run_qa does not: compare on the rest.
    keep = [i for i, ex in enumerate(exs) if len(tok.encode(ex.question.lstrip(), add_special_tokens=False).ids) <= 64]
    assert len(keep) > 0.99 * len(exs)
    enc = hf([exs[i].question.lstrip() for i in keep], [exs[i].context for i in keep], truncation="only_second",
             max_length=384, stride=128, return_overflowing_tokens=True)
    ours = [list(f.input_ids) for f in feats if f.example_index in set(keep)]
    assert len(ours) == len(enc["input_ids"])
    assert ours == enc["input_ids"]


def test_question_truncated_to_max_question_len(tokenizer_dir):
    from tinyqa.examples import Example
    tok = load_tokenizer(str(tokenizer_dir))
    q = "   " + " ".join(["why"] * 100) + "?"
    (f,) = featurize([Example("x", q, "Because.", ["Because"], (0, 7))], tok, FeaturizerConfig(max_question_len=10))
    q_ids = tok.encode(q.lstrip(), add_special_tokens=False).ids[:10]  # leading spaces dropped, then cut to 10
    assert list(f.input_ids[:13]) == [0] + q_ids + [2, 2]
    assert f.start_label == 13 and f.offsets[f.start_label][0] == 0 and f.offsets[f.end_label][1] == 7


def test_collate_pads_to_longest(squad):
    _, _, feats = squad
    batch = collate(feats[:3], with_labels=True)
    L = max(len(f.input_ids) for f in feats[:3])
    assert batch["input_ids"].shape == (3, L) and batch["attention_mask"].sum().item() == sum(len(f.input_ids) for f in feats[:3])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 1).all()
    assert batch["start_positions"].tolist() == [f.start_label for f in feats[:3]]


def test_length_sorted_batches_respect_rows_and_token_budget():
    import numpy as np
    from tinyqa.features import Feature, length_sorted_batches
    lengths = [5, 384, 100, 7, 384, 250, 384, 6, 90, 384, 300, 384]
    feats = [Feature(np.zeros(n, np.int32), np.zeros((n, 2), np.int32), i) for i, n in enumerate(lengths)]
    batches = length_sorted_batches([len(f.input_ids) for f in feats], batch_size=4, max_tokens=800)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # nothing lost or repeated
    for b in batches:
        ls = [lengths[i] for i in b]
        assert len(b) <= 4 and len(b) * max(ls) <= 800 and ls == sorted(ls), ls
    # by hand: 5 6 7 90 (4 rows) | 100 250 (adding 300 makes 3 x 300 = 900 > 800) | 300 384 (2 x 384 = 768;
    # a third 384 makes 1152) | 384 384 | 384 384
    assert [[lengths[i] for i in b] for b in batches] == [[5, 6, 7, 90], [100, 250], [300, 384], [384, 384], [384, 384]]
    assert [len(b) for b in length_sorted_batches([len(f.input_ids) for f in feats], batch_size=5)] == [5, 5, 2]


def test_window_labels_match_a_search_inside_each_window():
    """Labels come from the span's tokens in the whole context, clipped to each window. Oracle: the search
    done inside the window itself (the window's first token must start at or before the span, its last end
    at or after it; then the last token starting at or before the start, the first ending at or after the
    end), on offsets with several tokens sharing one character, as byte-level BPE gives an emoji."""
    from tinyqa.features import _span_tokens, _window_label
    rng = np.random.default_rng(0)
    for _ in range(400):
        n = int(rng.integers(1, 12))
        width = rng.integers(0, 3, size=n)  # 0: a token sharing the previous token's character
        starts = np.cumsum(np.r_[0, width[:-1]])
        ends = starts + np.maximum(width, 1)  # a width-0 step: the next token shares this character
        off = np.stack([starts, ends], axis=1)
        a = int(rng.integers(0, ends[-1]))
        b = int(rng.integers(a + 1, ends[-1] + 1))
        first, last = _span_tokens(off, (a, b))
        for start in range(n):
            for stop in range(start + 1, n + 1):
                w = off[start:stop]
                if w[0, 0] <= a and w[-1, 1] >= b:
                    expected = (int(np.searchsorted(w[:, 0], a, side="right")) - 1 + 5,
                                int(np.searchsorted(w[:, 1], b, side="left")) + 5)
                else:
                    expected = (0, 0)
                assert _window_label(first, last, start, stop, 5) == expected, (off.tolist(), a, b, start, stop)


def _spans_everywhere(contexts, seed=0):
    """Examples over the contexts with answer spans of every kind: random, the whole context, one space."""
    from tinyqa.examples import Example
    rng = np.random.default_rng(seed)
    out = []
    for i, c in enumerate(contexts):
        a = int(rng.integers(0, len(c)))
        b = int(rng.integers(a, len(c))) + 1
        spans = [(a, b), (0, len(c))] + [(j, j + 1) for j in [j for j, ch in enumerate(c) if ch.isspace()][:1]]
        out += [Example(f"{i}-{k}", "What?", c, [c[s:e]], (s, e)) for k, (s, e) in enumerate(spans)]
    return out


def test_byte_level_labels_equal_those_from_the_tokenizers_offsets(tokenizer_dir, text_pairs):
    """Training encodes byte-level BPE contexts without offsets (encode(words=False): encode_batch_fast) and
    labels them from the ids. Oracle: the tokenizer's own offsets, i.e. the full encode, whose windows and
    labels the tests above hold to transformers'. Spans: random, whole contexts, and all-space ones (stripped
    to nothing: the exact-offsets path); text: SQuAD dev's (accents, dashes, CJK) or the generated set's
    emoji, tabs and runs of spaces. Contexts writing a special token ("<s>") fall back to the full encode."""
    from tinyqa.features import _byte_level_offsets, cut_windows, encode, pair_layout
    tok = load_tokenizer(str(tokenizer_dir))
    contexts = list(dict.fromkeys(c for _, c in text_pairs))
    plain = [c for c in contexts if "<s>" not in c and "</s>" not in c and "<pad>" not in c]
    examples = _spans_everywhere(plain)
    fast, full = encode(examples, tok, words=False), encode(examples, tok)
    assert fast.byte_level is not None and full.byte_level is None
    assert all(e.offsets[-1] == (0, 0) for e in fast.context_encodings[:5])  # really without offsets
    for text, f, e in zip(fast.contexts, fast.context_encodings, full.context_encodings):
        assert f.ids == e.ids
        assert _byte_level_offsets(text, np.array(f.ids), fast.byte_level).tolist() == [list(o) for o in e.offsets]
    layout = pair_layout(tok)
    for cfg in (FeaturizerConfig(), FeaturizerConfig(64, 16, 20)):
        a, b = cut_windows(examples, fast, layout, cfg), cut_windows(examples, full, layout, cfg)
        for field in a.__dataclass_fields__:
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
        assert (a.start_label > 0).sum() > len(plain)  # the spans are labelled, not all (0, 0)
    special = [c for c in contexts if c not in plain]
    if special:
        assert encode(_spans_everywhere(special), tok, words=False).byte_level is None


def test_offsets_from_ids_only_for_byte_level_bpe_with_every_byte(tmp_path):
    """Any other tokenizer keeps the full encode; a byte-level BPE whose vocabulary lacks a byte (it then
    drops that byte without a trace) is refused with a one-line error rather than mislabelled."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from tinyqa.errors import TinyQAError
    from tinyqa.features import cut_windows, encode, pair_layout
    from tinyqa.examples import Example
    from tinyqa.tokenizer import build_from_vocab_txt, byte_level_vocab
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat"]) + "\n")
    assert byte_level_vocab(build_from_vocab_txt(str(tmp_path / "vocab.txt"))) is None
    letters = [chr(c) for c in range(ord("a"), ord("z"))]  # no "z"
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "Ġ", "?"] + letters)}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    assert byte_level_vocab(tok) is not None
    ex = [Example("1", "a?", "ab zab", ["ab"], (0, 2))]
    with pytest.raises(TinyQAError, match="do not cover every byte"):
        cut_windows(ex, encode(ex, tok, words=False), pair_layout(tok), FeaturizerConfig(32, 8, 8))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # offsets then count a space not in the text
    assert byte_level_vocab(tok) is None
