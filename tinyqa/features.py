"""Sliding windows over long contexts, span labels, and the padding collator.

Follows the windowing of google-research/bert `run_squad.py` and transformers' `run_qa.py`, with the
TinyRoBERTa-MRQA card's settings: max_seq_len 384, doc_stride 128, max_query_length 64.

Layout of one feature (RoBERTa's pair template):   <s> question </s></s> context-window </s>
so a window holds  budget = max_seq_len - len(question) - 4  context tokens.

`doc_stride` is the OVERLAP between consecutive windows, as in transformers (`stride=` of the tokenizer),
so windows start every  step = budget - doc_stride  tokens. Worked example: a 20-token question leaves
budget = 384 - 20 - 4 = 360; with doc_stride 128 the step is 232, so a 700-token context gets windows
[0, 360), [232, 592), [464, 700): every token lies in a window, and each border has 128 tokens of context
on both sides in some window. (haystack, which trained tinyroberta, called the step itself "doc_stride";
with its 128 the windows would overlap by 232 tokens instead.)

Question and context are tokenized separately (each unique context once) and windows cut from the
context's token array: the same tokens as tokenizing the pair, since byte-level BPE pre-tokenizes each
sequence on its own. Nothing is padded here; `collate` pads a batch to its longest feature.
"""
from dataclasses import dataclass

import numpy as np
import torch

from .errors import TinyQAError

CLS, PAD, SEP = 0, 1, 2  # RoBERTa's <s>, <pad>, </s>


@dataclass
class FeaturizerConfig:
    max_seq_len: int = 384
    doc_stride: int = 128  # overlap between windows (tokens)
    max_query_length: int = 64


@dataclass
class Feature:
    input_ids: np.ndarray  # (L,) int32, unpadded
    offsets: np.ndarray  # (L, 2) int32 char offsets into the context; (-1, -1) for question and special tokens
    example_index: int  # which example (question) this window belongs to
    words: np.ndarray = None  # (L,) int32 index of each context token's word (pre-token), -1 elsewhere:
    # what `align_to_words` extends an answer to (the QA pipeline's token_to_word / word_to_chars)
    start_label: int = 0  # token index of the answer start, or 0 (<s>) when the answer is not wholly inside
    end_label: int = 0


def windows(n_context: int, budget: int, doc_stride: int):
    """(start, stop) token ranges covering n_context tokens, consecutive ones overlapping by doc_stride.
    The same ranges as the `tokenizers` library's truncation with stride (the last window ends at n)."""
    if budget <= doc_stride:
        raise TinyQAError(f"a window of {budget} context tokens cannot overlap by doc_stride={doc_stride}: "
                          "lower --doc-stride or --max-query-length, or raise --max-seq-len")
    step, start, out = budget - doc_stride, 0, []
    while True:
        stop = min(start + budget, n_context)
        out.append((start, stop))
        if stop == n_context:
            return out
        start += step


def featurize(examples, tokenizer, cfg: FeaturizerConfig = FeaturizerConfig(), with_labels=True,
              with_offsets=True) -> list:
    """All windows of all examples, in example order. Labels are computed when with_labels; training,
    which never decodes, passes with_offsets=False to keep 516k windows' offsets out of memory."""
    # Tokenize each distinct context once (SQuAD has ~5 questions per context), in batches.
    context_index, contexts = {}, []
    for ex in examples:
        if id(ex.context) not in context_index:
            context_index[id(ex.context)] = len(contexts)
            contexts.append(ex.context)
    ctx_enc = tokenizer.encode_batch(contexts, add_special_tokens=False)
    ctx_ids = [np.asarray(e.ids, dtype=np.int32) for e in ctx_enc]
    ctx_off = [np.asarray(e.offsets, dtype=np.int32).reshape(-1, 2) for e in ctx_enc]
    ctx_words = [np.asarray([-1 if w is None else w for w in e.word_ids], dtype=np.int32)
                 for e in ctx_enc] if with_offsets else None
    # run_qa strips the question's leading whitespace: some SQuAD questions start with many spaces.
    q_enc = tokenizer.encode_batch([ex.question.lstrip() for ex in examples], add_special_tokens=False)

    features = []
    for i, ex in enumerate(examples):
        q = np.asarray(q_enc[i].ids[: cfg.max_query_length], dtype=np.int32)
        c = context_index[id(ex.context)]
        ids, off = ctx_ids[c], ctx_off[c]
        n_prefix = len(q) + 3  # <s> q </s></s>
        prefix_ids = np.concatenate([[CLS], q, [SEP, SEP]]).astype(np.int32)
        budget = cfg.max_seq_len - len(q) - 4
        for start, stop in windows(len(ids), budget, cfg.doc_stride):
            f = Feature(
                input_ids=np.concatenate([prefix_ids, ids[start:stop], [SEP]]).astype(np.int32),
                offsets=np.concatenate([np.full((n_prefix, 2), -1, np.int32), off[start:stop],
                                        np.full((1, 2), -1, np.int32)]),
                example_index=i)
            if with_offsets:
                f.words = np.concatenate([np.full(n_prefix, -1, np.int32), ctx_words[c][start:stop], [-1]]).astype(np.int32)
            if with_labels and ex.span is not None:
                f.start_label, f.end_label = _label(off[start:stop], ex.span, n_prefix)
            if not with_offsets:
                f.offsets = None
            features.append(f)
    return features


def _label(window_offsets: np.ndarray, span, n_prefix: int):
    """Token positions of the char span (start, end-exclusive) in this window, or (0, 0) when the span is
    not wholly inside it. Worked example: context "The Eiffel Tower", span (4, 16) "Eiffel Tower", tokens
    "The"(0,3) " Eiff"(4,8) "el"(8,10) " Tower"(11,16): start = last token starting at or before 4 = 1,
    end = first token ending at or after 16 = 3."""
    if len(window_offsets) == 0:
        return 0, 0
    a, b = span
    starts, ends = window_offsets[:, 0], window_offsets[:, 1]
    if not (starts[0] <= a and ends[-1] >= b):
        return 0, 0
    s = int(np.searchsorted(starts, a, side="right")) - 1
    e = int(np.searchsorted(ends, b, side="left"))
    return s + n_prefix, e + n_prefix


def collate(features, with_labels=False):
    """Pad a list of features to the longest in it: input_ids (B, L) with <pad>, attention_mask (B, L)."""
    L = max(len(f.input_ids) for f in features)
    ids = np.full((len(features), L), PAD, dtype=np.int64)
    mask = np.zeros((len(features), L), dtype=np.int64)
    for i, f in enumerate(features):
        ids[i, : len(f.input_ids)] = f.input_ids
        mask[i, : len(f.input_ids)] = 1
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if with_labels:
        batch["start_positions"] = torch.tensor([f.start_label for f in features])
        batch["end_positions"] = torch.tensor([f.end_label for f in features])
    return batch


def length_sorted_batches(features, batch_size, max_tokens=None):
    """Indices of features grouped into batches of similar length, so padding stays minimal. With
    max_tokens, a batch also stops growing before rows x longest window would pass it: batches of long
    windows get fewer rows, which bounds the activations' memory (a 384-token batch of 64 needs over 1 GB
    for one tinyroberta feed-forward) without shrinking the matmuls of short windows."""
    order = sorted(range(len(features)), key=lambda i: len(features[i].input_ids))
    batches, batch = [], []
    for i in order:
        n = len(features[i].input_ids)  # the longest so far: the order is ascending
        if batch and (len(batch) == batch_size or (max_tokens and (len(batch) + 1) * n > max_tokens)):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches
