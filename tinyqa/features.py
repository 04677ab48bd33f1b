"""Sliding windows over long contexts, span labels, and the padding collator.

Follows the windowing of google-research/bert `run_squad.py` and transformers' `run_qa.py`, with the
TinyRoBERTa-MRQA card's settings: max_seq_len 384, doc_stride 128, max_question_len 64.

The special tokens around question and context come from the tokenizer's own pair template, read off
once (`pair_layout`), so every family lays its windows out as its tokenizer does:
    RoBERTa                 <s> question </s></s> context-window </s>      token types all 0
    BERT, ELECTRA, DeBERTa  [CLS] question [SEP] context-window [SEP]      types 0 ... 0 1 ... 1
and a window holds  budget = max_seq_len - len(question) - n_special  context tokens (n_special 4 or 3).

`doc_stride` is the OVERLAP between consecutive windows, as in transformers (`stride=` of the tokenizer),
so windows start every  step = budget - doc_stride  tokens. Worked example (RoBERTa): a 20-token question
leaves budget = 384 - 20 - 4 = 360; with doc_stride 128 the step is 232, so a 700-token context gets windows
[0, 360), [232, 592), [464, 700): every token lies in a window, and each border has 128 tokens of context
on both sides in some window. (haystack, which trained tinyroberta, called the step itself "doc_stride";
with its 128 the windows would overlap by 232 tokens instead.)

Question and context are tokenized separately (each unique context once) and windows cut from the
context's token array: the same tokens as tokenizing the pair, since all three tokenizers pre-tokenize each
sequence on its own. Token offsets are trimmed to their non-space characters: SentencePiece's "▁word"
tokens (DeBERTa) cover the space before the word, and without the trim an answer would come out as
" Paris". Answer spans are stripped the same way before labelling, so labels and decoded answers are
exact, stripped substrings of the context in every family. Nothing is padded here; `collate` pads a batch
to its longest feature with the model's pad id.
"""
import sys
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from typing import Optional

import numpy as np
import torch

from .errors import TinyQAError
from .tokenizer import ByteLevelVocab, byte_level_vocab

PAD_TOKENS = ("<pad>", "[PAD]")  # RoBERTa's, then BERT's, ELECTRA's and DeBERTa's


@dataclass
class FeaturizerConfig:
    max_seq_len: int = 384
    doc_stride: int = 128  # overlap between windows (tokens)
    max_question_len: int = 64


@dataclass
class Feature:
    input_ids: np.ndarray  # (L,) int32, unpadded
    offsets: np.ndarray  # (L, 2) int32 char offsets into the context; (-1, -1) for question and special tokens
    example_index: int  # which example (question) this window belongs to
    words: np.ndarray = None  # (L,) int32 index of each context token's word (pre-token), -1 elsewhere:
    # what `align_to_words` extends an answer to (the QA pipeline's token_to_word / word_to_chars)
    start_label: int = 0  # token index of the answer start, or 0 (<s>, [CLS]) when the answer is not wholly inside
    end_label: int = 0
    token_type_ids: Optional[np.ndarray] = None  # (L,) int8 segment ids; None when all 0 (RoBERTa)
    n_prefix: int = 0  # tokens before the context: special tokens and the question


@dataclass(frozen=True)
class PairLayout:
    """Where a tokenizer's pair template puts its special tokens and token types around question and context."""
    before: tuple  # special ids before the question: (<s>,) or ([CLS],)
    between: tuple  # between question and context: (</s>, </s>) or ([SEP],)
    after: tuple  # after the context: (</s>,) or ([SEP],)
    before_types: tuple  # the token type of each of those, and of the question and context tokens
    question_type: int
    between_types: tuple
    context_type: int
    after_types: tuple
    pad_id: Optional[int]  # the tokenizer's pad token, when it has one

    @property
    def n_special(self) -> int:
        return len(self.before) + len(self.between) + len(self.after)

    @cached_property  # type_ids asks for it once per window
    def max_type(self) -> int:
        return max(self.before_types + self.between_types + self.after_types + (self.question_type, self.context_type))

    def type_ids(self, n_question: int, n_context: int):
        """(n_question + n_context + n_special,) int8, or None when every type is 0."""
        if self.max_type == 0:
            return None
        return np.concatenate([self.before_types, np.full(n_question, self.question_type), self.between_types,
                               np.full(n_context, self.context_type), self.after_types]).astype(np.int8)


def pair_layout(tokenizer) -> PairLayout:
    """Read the layout off the tokenizer's own post-processor by encoding a dummy pair: the tokens whose
    sequence id is None are its special tokens, and their places around sequences 0 and 1 say where each
    goes. RoBERTa's gives before=(0,), between=(2, 2), after=(2,); BERT's (101,), (102,), (102,) with the
    context and the last [SEP] of type 1."""
    if tokenizer.truncation or tokenizer.padding:
        raise TinyQAError("the tokenizer truncates or pads: windows and padding are made here; load it with "
                          "tinyqa.load_tokenizer, or call no_truncation() and no_padding() on it")
    enc = tokenizer.encode("question", "context")
    seq, ids, types = enc.sequence_ids, enc.ids, enc.type_ids
    q_at = [i for i, s in enumerate(seq) if s == 0]
    c_at = [i for i, s in enumerate(seq) if s == 1]
    if not q_at or not c_at or q_at[0] == 0:
        raise TinyQAError("the tokenizer has no pair template with a leading special token (<s> or [CLS]): "
                          "windows need one at position 0, the label of 'no answer in this window'")
    before, between, after = range(0, q_at[0]), range(q_at[-1] + 1, c_at[0]), range(c_at[-1] + 1, len(ids))
    pad_id = next((tokenizer.token_to_id(t) for t in PAD_TOKENS if tokenizer.token_to_id(t) is not None), None)
    return PairLayout(tuple(ids[i] for i in before), tuple(ids[i] for i in between), tuple(ids[i] for i in after),
                      tuple(types[i] for i in before), types[q_at[0]], tuple(types[i] for i in between),
                      types[c_at[0]], tuple(types[i] for i in after), pad_id)


def check_model_fits(cfg, tokenizer, max_seq_len: int, name: str = "the model"):
    """Refuse, before any work, windows or a tokenizer that the model (an EncoderConfig) cannot take."""
    if max_seq_len > cfg.max_window_len:
        raise TinyQAError(f"max_seq_len {max_seq_len} is longer than {name}'s {cfg.max_window_len} positions: "
                          f"pass --max-seq-len {cfg.max_window_len} or less")
    layout = pair_layout(tokenizer)
    n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_vocab > cfg.vocab_size:
        raise TinyQAError(f"the tokenizer has {n_vocab} tokens but {name} only {cfg.vocab_size} embeddings: "
                          "it is not this model's tokenizer (pass --tokenizer with the right one)")
    if n_vocab < 0.9 * cfg.vocab_size:
        _notice_once(f"notice: the tokenizer has {n_vocab} tokens and {name} {cfg.vocab_size} embeddings: if it is "
                     "not the model's own tokenizer, every answer is wrong (a model's rows beyond its tokenizer "
                     "are usually a few, for alignment)")
    if layout.pad_id is not None and layout.pad_id != cfg.pad_token_id:
        raise TinyQAError(f"the tokenizer's pad id is {layout.pad_id} but {name}'s pad_token_id is "
                          f"{cfg.pad_token_id}: it is not this model's tokenizer")
    if cfg.type_vocab_size > 0 and layout.max_type >= cfg.type_vocab_size:
        raise TinyQAError(f"the tokenizer gives token type {layout.max_type} but {name} has type_vocab_size "
                          f"{cfg.type_vocab_size}: it is not this model's tokenizer")


_NOTICES = set()


def _notice_once(message):
    """A notice on stderr, once per process: check_model_fits runs for every chunk of a long evaluation."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(message, file=sys.stderr)


def window_ranges(n_context: np.ndarray, budget: np.ndarray, doc_stride: int):
    """(start, stop, owner), each (windows,): the context-token ranges [start, stop) of the windows of
    several contexts, context k having n_context[k] tokens and room for budget[k] of them per window.
    Consecutive windows overlap by doc_stride, so they start every step = budget - doc_stride tokens, and the
    last one ends at the context's end: the ranges of the `tokenizers` library's truncation with stride.
    A context gets 1 + ceil((n - budget) / step) windows (1 when it fits). One context, as in the module's
    worked example: n 700, budget 360, doc_stride 128 -> (0, 360), (232, 592), (464, 700)."""
    n_context, budget = np.asarray(n_context, np.int64), np.asarray(budget, np.int64)
    if (budget <= doc_stride).any():
        raise TinyQAError(f"a window of {budget.min()} context tokens cannot overlap by doc_stride={doc_stride}: "
                          "lower --doc-stride or --max-question-len, or raise --max-seq-len")
    step = budget - doc_stride
    count = 1 + np.maximum(0, -((budget - n_context) // step))  # -(-x // y): x / y rounded up
    owner = np.repeat(np.arange(len(count)), count)  # (windows,) the context of each window
    rank = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)  # 0, 1, ... within a context
    start = rank * step[owner]
    return start, np.minimum(start + budget[owner], n_context[owner]), owner


@dataclass
class Encoded:
    """What the tokenizer gives for a list of examples: each distinct context once, every question."""
    context_of: list  # (examples,) index of each example's context in `contexts`
    contexts: list  # the distinct context strings
    context_encodings: list  # tokenizers.Encoding per distinct context, no special tokens
    question_encodings: list  # tokenizers.Encoding per example
    byte_level: Optional[ByteLevelVocab] = None  # set when the contexts' encodings have no offsets (see encode)


def encode(examples, tokenizer, words=True) -> Encoded:
    """The tokenizer's part of `featurize`: two encode_batch calls (contexts, questions). Kept apart because
    encode_batch releases Python's GIL: the feature store runs it for the next chunk of examples in a thread
    while this one is cut into windows (tinyqa/store.py).
    words=False (training: labels, no decoding) lets RoBERTa's byte-level BPE encode the contexts with
    encode_batch_fast too, which skips the offsets, the bulk of the tokenizer's work on long contexts (what
    it saves the feature store's build: docs/benchmarks.md): the labels are then found
    from the ids (`_byte_level_span_tokens`). Decoding needs each token's word (align_to_words), which only
    the full call gives."""
    index, contexts, context_of = {}, [], []
    for ex in examples:  # SQuAD has ~5 questions per context: tokenize each context once
        if id(ex.context) not in index:
            index[id(ex.context)] = len(contexts)
            contexts.append(ex.context)
        context_of.append(index[id(ex.context)])
    vocab = None if words else byte_level_vocab(tokenizer)
    if vocab is not None and any(t in c for c in contexts for t in vocab.specials):
        vocab = None  # "<s>" written in a context is one token whose offsets the ids do not give: the full call
    if vocab is not None:
        ctx_enc = tokenizer.encode_batch_fast(contexts, add_special_tokens=False)
    else:
        ctx_enc = tokenizer.encode_batch(contexts, add_special_tokens=False)
    # run_qa strips the question's leading whitespace: some SQuAD questions start with many spaces.
    # Questions need only their ids: encode_batch_fast (tokenizers >= 0.21) skips the offsets.
    encode_ids = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    q_enc = encode_ids([ex.question.lstrip() for ex in examples], add_special_tokens=False)
    return Encoded(context_of, contexts, ctx_enc, q_enc, vocab)


@dataclass
class WindowTable:
    """The windows of a list of examples as flat arrays, in example order: what the feature store writes
    (tinyqa/store.py) and what `featurize` makes its Feature objects of."""
    input_ids: np.ndarray  # (tokens,) int32: every window's ids, one window after another
    bounds: np.ndarray  # (windows + 1,) int64: window w is input_ids[bounds[w]:bounds[w + 1]]
    example_index: np.ndarray  # (windows,) the example each window belongs to
    start: np.ndarray  # (windows,) the window's context tokens are context[start:stop]
    stop: np.ndarray
    n_prefix: np.ndarray  # (windows,) tokens before the context: special tokens and the question
    start_label: np.ndarray  # (windows,) token index of the answer start, 0 when not wholly inside
    end_label: np.ndarray

    def __len__(self):
        return len(self.example_index)


def cut_windows(examples, enc: Encoded, layout: PairLayout, cfg: FeaturizerConfig, with_labels=True) -> WindowTable:
    """Every example's windows, built with array operations over all of them: MRQA train has a million
    windows, and cutting them one at a time in Python (a Feature object each) would be most of the store
    build's main-thread work, which on 2 cores competes with the tokenizer. What is left per example is
    reading its question's ids and finding its answer's tokens."""
    ctx_ids = [np.asarray(e.ids, dtype=np.int32) for e in enc.context_encodings]
    q_ids = [np.asarray(e.ids[: cfg.max_question_len], dtype=np.int32) for e in enc.question_encodings]
    context_of = np.asarray(enc.context_of, dtype=np.int64)  # (E,)
    n_ctx = np.array([len(x) for x in ctx_ids], dtype=np.int64)  # (C,)
    n_q = np.array([len(x) for x in q_ids], dtype=np.int64)  # (E,)
    start, stop, ex = window_ranges(n_ctx[context_of], cfg.max_seq_len - n_q - layout.n_special, cfg.doc_stride)
    n_prefix = len(layout.before) + n_q + len(layout.between)  # (E,)

    # A window is five pieces end to end: before, question, between, context[start:stop], after
    # (<s> q </s></s> c </s>, or [CLS] q [SEP] c [SEP]). Each is a slice of one source array, so all the
    # windows' ids are a single gather from it: piece p of length n starting at src[a] fills out[o:o + n]
    # with src[a:a + n], i.e. out[j] = src[j + a - o] for o <= j < o + n.
    specials = np.asarray(layout.before + layout.between + layout.after, dtype=np.int32)
    src = np.concatenate([*ctx_ids, *q_ids, specials])
    ctx_at = np.cumsum(n_ctx) - n_ctx  # where each context, question and special starts in src
    q_at = n_ctx.sum() + np.cumsum(n_q) - n_q
    sp_at = n_ctx.sum() + n_q.sum() + np.cumsum([0, len(layout.before), len(layout.between)])
    W = len(ex)
    piece_at = np.stack([np.full(W, sp_at[0]), q_at[ex], np.full(W, sp_at[1]), ctx_at[context_of[ex]] + start,
                         np.full(W, sp_at[2])], axis=1).ravel()  # (W * 5,)
    piece_len = np.stack([np.full(W, len(layout.before)), n_q[ex], np.full(W, len(layout.between)), stop - start,
                          np.full(W, len(layout.after))], axis=1).ravel()
    piece_out = np.cumsum(piece_len) - piece_len
    input_ids = src[np.repeat(piece_at - piece_out, piece_len) + np.arange(piece_len.sum())]
    bounds = np.concatenate([[0], np.cumsum(piece_len.reshape(W, 5).sum(axis=1))])

    first, last = np.full(len(examples), -1), np.full(len(examples), -1)  # the answer's context tokens; -1: none
    labelled = [i for i, example in enumerate(examples) if with_labels and example.span is not None]
    if enc.byte_level is not None and labelled:  # contexts encoded without offsets: from the ids, all at once
        spans = np.array([_utf8_span(examples[i].context, strip_span(examples[i].context, examples[i].span))
                          for i in labelled], dtype=np.int64)
        first[labelled], last[labelled] = _byte_level_span_tokens(enc, src[:n_ctx.sum()], n_ctx, context_of[labelled],
                                                                  spans)
    else:
        for i in labelled:
            c = enc.context_of[i]
            first[i], last[i] = _span_tokens_of(examples[i].context, enc.context_encodings[c],
                                                strip_span(examples[i].context, examples[i].span))
    start_label, end_label = _window_label(first[ex], last[ex], start, stop, n_prefix[ex])
    return WindowTable(input_ids, bounds, ex, start, stop, n_prefix[ex], start_label, end_label)


def featurize(examples, tokenizer, cfg: FeaturizerConfig = FeaturizerConfig(), with_labels=True,
              with_offsets=True, encoded: Encoded = None) -> list:
    """All windows of all examples, in example order, as Feature objects. Labels are computed when
    with_labels; training, which never decodes, passes with_offsets=False to keep 516k windows' offsets out
    of memory. `encoded`: `encode(examples, tokenizer)` when the caller already has it."""
    layout = pair_layout(tokenizer)
    enc = encoded if encoded is not None else encode(examples, tokenizer, words=with_offsets)
    table = cut_windows(examples, enc, layout, cfg, with_labels)
    if with_offsets:  # what decoding needs
        ctx_off = [token_offsets(text, e) for text, e in zip(enc.contexts, enc.context_encodings)]
        ctx_words = [np.asarray([-1 if w is None else w for w in e.word_ids], dtype=np.int32)
                     for e in enc.context_encodings]
    n_after = len(layout.after)
    features = []
    for w in range(len(table)):
        i, start, stop, n_prefix = (int(x[w]) for x in (table.example_index, table.start, table.stop, table.n_prefix))
        f = Feature(input_ids=table.input_ids[table.bounds[w]:table.bounds[w + 1]], offsets=None, example_index=i,
                    start_label=int(table.start_label[w]), end_label=int(table.end_label[w]), n_prefix=n_prefix,
                    token_type_ids=layout.type_ids(n_prefix - len(layout.before) - len(layout.between), stop - start))
        if with_offsets:
            c = enc.context_of[i]
            f.offsets = np.concatenate([np.full((n_prefix, 2), -1, np.int32), ctx_off[c][start:stop],
                                        np.full((n_after, 2), -1, np.int32)])
            f.words = np.concatenate([np.full(n_prefix, -1, np.int32), ctx_words[c][start:stop],
                                      np.full(n_after, -1, np.int32)])
        features.append(f)
    return features


def token_offsets(text: str, encoding) -> np.ndarray:
    """The encoding's (L, 2) char offsets, trimmed. (fromiter over the flattened pairs: faster than
    np.asarray of the list of tuples, which the tokenizers getter builds a Python tuple per token for.)"""
    flat = np.fromiter(chain.from_iterable(encoding.offsets), np.int32, 2 * len(encoding))
    return trim_offsets(text, flat.reshape(-1, 2))


def trim_offsets(text: str, offsets: np.ndarray) -> np.ndarray:
    """Each token's (start, end) shrunk to its non-space characters; a token of spaces only becomes empty at
    its end. SentencePiece (DeBERTa-v3): "Paris lies on the Seine" -> "▁Paris"(0,5) "▁lies"(5,11) ...:
    (5, 11) covers " lies" and becomes (6, 11). RoBERTa's and BERT's offsets exclude spaces already: when no
    token starts or ends with a space there is nothing to trim, and the offsets come back as they are."""
    if len(offsets) == 0:
        return offsets
    space = _is_space(text)  # (n,) bool per character
    s, e = offsets[:, 0], offsets[:, 1]
    real = e > s
    if not (space[s[real]].any() or space[e[real] - 1].any()):
        return offsets
    keep = np.flatnonzero(~space)  # (m,) sorted positions of the non-space characters
    i = np.searchsorted(keep, s)  # the first non-space character at or after each start
    new_s = np.minimum(np.where(i < len(keep), keep[np.minimum(i, len(keep) - 1)], len(text)), e)
    j = np.searchsorted(keep, e) - 1  # the last non-space character before each end
    new_e = np.maximum(np.where(j >= 0, keep[np.maximum(j, 0)] + 1, 0), new_s)
    return np.stack([new_s, new_e], axis=1).astype(np.int32)


# The characters str.isspace() accepts: all below U+3001 (checked in tests/test_family.py).
_SPACES = np.array([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680,
                    *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000])
_IS_SPACE = np.zeros(0x3002, bool)  # by code point; everything from U+3001 up shares the last entry, False
_IS_SPACE[_SPACES] = True


def _is_space(text: str) -> np.ndarray:
    """str.isspace() of every character, without a Python loop: the code points (UTF-32) looked up in a
    table, far faster than a regex over the spaces."""
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return _IS_SPACE.take(code_points, mode="clip")  # clip: code points past the table read its last entry


def strip_span(text: str, span):
    """An answer's (start, end) char span without leading or trailing whitespace."""
    a, b = span
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _span_tokens(offsets: np.ndarray, span):
    """The context tokens (first, last) of the char span (start, end-exclusive): first = the last token
    starting at or before start, last = the first token ending at or after end. Worked example: context
    "The Eiffel Tower", span (4, 16) "Eiffel Tower", tokens "The"(0,3) " Eiff"(4,8) "el"(8,10) " Tower"(11,16):
    first = 1, last = 3. Offsets are trimmed and the span stripped, so a token made of spaces only, (p, p) just
    before a word at p, loses to the word's own token for the start."""
    a, b = span
    return (int(np.searchsorted(offsets[:, 0], a, side="right")) - 1,
            int(np.searchsorted(offsets[:, 1], b, side="left")))


def _span_tokens_of(text: str, encoding, span):
    """_span_tokens(token_offsets(text, encoding), span) from three lookups in the tokenizer's own (Rust) offsets
    instead of a Python tuple per context token: the labels of training's windows, which need no offsets.
    char_to_token gives the FIRST token holding a character. For the span's last character that is `last`;
    for its first character it is `first` unless the next token holds that character too (byte-level BPE
    splits an emoji into several tokens with the same offsets), which, like a character no token holds,
    takes the full path. Trimming changes neither: the span is stripped, so both characters are not spaces
    and stay inside their tokens."""
    a, b = span
    first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1) if b > a else None
    if first is not None and last is not None and (first + 1 == len(encoding) or
                                                   encoding.token_to_chars(first + 1)[0] > a):
        return first, last
    return _span_tokens(token_offsets(text, encoding), span)


def _byte_level_span_tokens(enc: Encoded, ids, n_ctx, context_of, spans):
    """_span_tokens for many (context, stripped span) pairs at once, for contexts encoded without offsets
    (byte-level BPE, tokenizer.ByteLevelVocab): the same (first, last) as the tokenizer's offsets give (checked
    on every SQuAD dev context, non-ASCII text and all-space spans in tests/test_features.py), at the cost of
    one cumsum over the chunk's tokens instead of offsets for every token.
    ids: (T,) the contexts' ids end to end; n_ctx: (C,) tokens per context; context_of: (S,) each span's
    context; spans: (S, 4) rows of _utf8_span: (a, b) in chars and the two byte positions compared below.

    Why no offsets are needed: the tokens cover the context's UTF-8 bytes end to end, so token i ends at byte
    ends[i] and starts where token i - 1 ended. A token's char start is <= a iff its first byte lies before
    char a + 1's; its char end is >= b iff its last byte lies at or past char b - 1's. And trimming (the
    tokenizer's of the spaces BPE glues to words, and trim_offsets) only moves a token's ends across spaces,
    which changes neither comparison while chars a and b - 1 are not spaces: only an all-space span (stripped
    to a == b) needs the trimmed offsets, which `_byte_level_offsets` gives."""
    vocab = enc.byte_level
    n_bytes = vocab.n_bytes[ids]
    ends = np.cumsum(n_bytes)  # (T,) each token's end, in bytes of the contexts laid end to end
    token_at = np.cumsum(n_ctx) - n_ctx  # (C,) each context's first token (every context has one)
    sizes = np.array([len(c) if c.isascii() else len(c.encode()) for c in enc.contexts])
    if not np.array_equal(np.add.reduceat(n_bytes, token_at), sizes):  # a BPE vocabulary lacking a byte drops it
        raise TinyQAError("the tokenizer's tokens do not cover every byte of the contexts (its byte-level "
                          "vocabulary lacks some bytes), so their offsets cannot be found: use one with all 256")
    byte_at = np.cumsum(sizes) - sizes  # (C,) where each context starts
    a, b = spans[:, 0], spans[:, 1]
    first = np.searchsorted(ends, byte_at[context_of] + spans[:, 2], side="right") - token_at[context_of]
    last = np.searchsorted(ends, byte_at[context_of] + spans[:, 3], side="left") - token_at[context_of]
    for k in np.flatnonzero(a == b):  # all-space spans (bad data, rare): the exact, trimmed offsets
        c = context_of[k]
        text = enc.contexts[c]
        offsets = trim_offsets(text, _byte_level_offsets(text, ids[token_at[c]:token_at[c] + n_ctx[c]], vocab))
        first[k], last[k] = _span_tokens(offsets, (a[k], b[k]))
    return first, last


def _byte_level_offsets(text: str, ids, vocab) -> np.ndarray:
    """The (L, 2) char offsets the tokenizer gives one context's tokens (its trim of leading and trailing
    spaces included), from their ids: a token splitting a character (an emoji's bytes) gets that character's."""
    n = vocab.n_bytes[ids]
    end = np.cumsum(n)
    start = np.minimum(end - n + vocab.lead[ids], end)
    end = np.maximum(end - vocab.trail[ids], start)
    if not text.isascii():  # bytes -> chars: the char holding the first byte, one past the char of the last
        code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        utf8_len = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
        char_of = np.append(np.repeat(np.arange(len(code_points)), utf8_len), len(code_points))
        start, end = char_of[start], np.where(end > start, char_of[np.maximum(end - 1, 0)] + 1, char_of[start])
    return np.stack([start, end], axis=1).astype(np.int32)


def _utf8_span(text: str, span):
    """(a, b, x, y) for a stripped char span (a, b): x the byte just before char a + 1, y one past the first
    byte of char b - 1 (see _byte_level_span_tokens)."""
    a, b = span
    if text.isascii():
        return a, b, a, b
    return a, b, len(text[:a + 1].encode()) - 1, len(text[:max(b - 1, 0)].encode()) + 1


def _window_label(first, last, start, stop, n_prefix):
    """Token positions of the span in the window of context tokens [start, stop), or (0, 0) when it is not
    wholly inside: the window's first token must start at or before the span (first >= start) and its last
    end at or after it (last < stop). The min/max: tokens sharing one character's offsets (byte-level BPE
    splits an emoji into several) can put `first` past the window's end or `last` before its start.
    Arrays (one entry per window) or ints."""
    inside = (first >= start) & (last < stop)
    return (np.where(inside, np.minimum(first, stop - 1) - start + n_prefix, 0),
            np.where(inside, np.maximum(last, start) - start + n_prefix, 0))


def collate(features, with_labels=False, pad_id=1):
    """Pad a list of features to the longest in it (pad_batch), with their labels when with_labels."""
    labels = ([f.start_label for f in features], [f.end_label for f in features]) if with_labels else None
    return pad_batch([(f.input_ids, f.token_type_ids) for f in features], pad_id, labels)


def pad_batch(windows, pad_id=1, labels=None):
    """The batch of windows, each (input_ids, token_type_ids or None), padded to the longest: input_ids (B, L)
    with pad_id (the model config's pad_token_id: RoBERTa's positions depend on it; 1 is RoBERTa's),
    attention_mask (B, L), token_type_ids (B, L), 0 beyond each window; with labels, their (starts, ends)
    as start_positions and end_positions (B,). What both inference and the feature store batch with."""
    L = max(len(ids) for ids, _ in windows)
    ids = np.full((len(windows), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(windows), L), dtype=np.int64)
    types = np.zeros((len(windows), L), dtype=np.int64)
    for i, (window, window_types) in enumerate(windows):
        ids[i, : len(window)] = window
        mask[i, : len(window)] = 1
        if window_types is not None:
            types[i, : len(window)] = window_types
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
             "token_type_ids": torch.from_numpy(types)}
    if labels is not None:
        batch["start_positions"] = torch.as_tensor(np.asarray(labels[0], dtype=np.int64))
        batch["end_positions"] = torch.as_tensor(np.asarray(labels[1], dtype=np.int64))
    return batch


def length_sorted_batches(lengths, batch_size, max_tokens=None):
    """Indices of windows (given their lengths) grouped into batches of similar length, so padding stays
    minimal. With max_tokens, a batch also stops growing before rows x longest window would pass it:
    batches of long windows get fewer rows, which bounds the activations' memory (a 384-token batch of 64
    needs over 1 GB for one tinyroberta feed-forward) without shrinking the matmuls of short windows."""
    lengths = [int(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches, batch = [], []
    for i in order:
        n = lengths[i]  # the longest so far: the order is ascending
        if batch and (len(batch) == batch_size or (max_tokens and (len(batch) + 1) * n > max_tokens)):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches
