"""Distillation across tokenizers: the teacher reads each student window in its own tokens, and its start and
end distributions are carried to the student's tokens through character offsets.

For a student window whose context tokens cover the characters [c0, c1) of the context, the teacher's window
is its own tokenization of the same question and of the same stretch [c0, c1): the teacher's tokens of the
WHOLE context (so a word is split as it is anywhere else) that lie wholly inside [c0, c1). Where the two
tokenizers cut the edge differently, a teacher token that straddles c0 or c1 is left out: the teacher never
sees text the student's window does not hold. A teacher window longer than the teacher's positions (its
tokenizer is the less thrifty one) keeps its first tokens, and the student's tokens past them get no mass.

Each teacher position then gives its probability to one student position:
- a start to the student token holding the teacher token's first character, an end to the one holding its
  last: mass of teacher tokens that begin (end) inside a student token goes to that token, so "Paris"
  split as "Par" "is" by one tokenizer and kept whole by the other starts and ends at the same characters;
- a first (last) character that no student token holds (a character the student's tokenizer drops, such as
  a zero-width space) goes to the next (previous) student token of the same question or context, unless
  the teacher token lies wholly past the student's tokens of it;
- special tokens by role: the teacher's <s>/[CLS] to the student's, its separators to the student's
  separators at the same place (the k-th, or the student's last when it has fewer: RoBERTa has two
  between question and context, BERT one);
- a teacher token with the very offsets of a student token goes to it; tokens sharing identical offsets
  (byte-level BPE splits a character it has no merge for, an emoji or a rare CJK character, into several;
  tokens of spaces only have empty offsets) are matched in order, so that the same tokenizer on both sides
  maps every position to itself;
- mass that no student token can take (a teacher question token past the student's --max-question-len, a
  separator the student lacks) goes to position 0, the student's <s>/[CLS], which in extractive QA means
  "no answer in this window": the distributions keep their total of 1, nothing is dropped.
So where the student's tokens can express the teacher's answer exactly, its start and end positions carry
all the mass the teacher put on that answer's first and last characters.
"""
from typing import NamedTuple

import numpy as np

from .features import FeaturizerConfig, featurize, pair_layout, token_offsets

SPECIAL = (0, 2, 4)  # segment codes of the special tokens; 1 is the question, 3 the context
BEFORE, QUESTION, BETWEEN, CONTEXT, AFTER = range(5)


class Positions(NamedTuple):
    """One window's positions: seg (L,) the segment code of each, and (a, b) (L,) its characters [a, b) in
    the question or context (for a special token, a is its index among its segment's)."""
    seg: np.ndarray
    a: np.ndarray
    b: np.ndarray


def positions(layout, question_offsets, context_offsets) -> Positions:
    """The Positions of a window laid out as `layout` (features.PairLayout) says, around the question's and
    context's (n, 2) char offsets."""
    pieces = [(BEFORE, len(layout.before)), (QUESTION, question_offsets), (BETWEEN, len(layout.between)),
              (CONTEXT, context_offsets), (AFTER, len(layout.after))]
    seg, a, b = [], [], []
    for code, piece in pieces:
        if code in SPECIAL:
            piece = np.stack([np.arange(piece), np.arange(piece) + 1], axis=1).reshape(-1, 2)
        seg.append(np.full(len(piece), code, np.int8))
        a.append(piece[:, 0])
        b.append(piece[:, 1])
    return Positions(np.concatenate(seg), np.concatenate(a).astype(np.int64), np.concatenate(b).astype(np.int64))


def _same_offsets(sa, sb, ta, tb):
    """(index, found), each (teacher tokens,): the student token with the teacher token's very offsets,
    and whether there is one. Within a run of tokens with identical offsets (byte-level BPE's pieces of one
    character; the empty offsets of a token of spaces) the r-th teacher token gets the r-th student one."""
    scale = int(max(sb.max(initial=0), tb.max(initial=0))) + 1
    s_key, t_key = sa * scale + sb, ta * scale + tb  # one sortable number per (start, end)
    order = np.argsort(s_key, kind="stable")
    lo, hi = np.searchsorted(s_key[order], t_key, "left"), np.searchsorted(s_key[order], t_key, "right")
    t_order = np.argsort(t_key, kind="stable")
    rank = np.empty(len(t_key), np.int64)
    rank[t_order] = np.arange(len(t_key)) - np.searchsorted(t_key[t_order], t_key[t_order], "left")
    return order[np.clip(np.minimum(lo + rank, hi - 1), 0, len(order) - 1)], hi > lo


def position_map(student: Positions, teacher: Positions):
    """(start_to, end_to), each (teacher positions,) int64: the student position that takes each teacher
    position's start and end probability (0 where none can: see the module's rules)."""
    start_to = np.zeros(len(teacher.seg), np.int64)
    end_to = np.zeros(len(teacher.seg), np.int64)
    for code in range(5):
        t, s = np.flatnonzero(teacher.seg == code), np.flatnonzero(student.seg == code)
        if not len(t) or not len(s):
            continue
        if code in SPECIAL:  # by role and order
            start_to[t] = end_to[t] = s[np.minimum(np.arange(len(t)), len(s) - 1)]
            continue
        ta, tb, sa, sb = teacher.a[t], teacher.b[t], student.a[s], student.b[s]
        same, found = _same_offsets(sa, sb, ta, tb)
        # otherwise a start goes to the first student token ending after the teacher token's first character
        # (the one holding it, else the next), an end to the last one starting at or before its last character
        j = np.where(found, same, np.searchsorted(sb, ta, side="right"))
        k = np.where(found, same, np.searchsorted(sa, tb - 1, side="right") - 1)
        overlaps = found | ((ta < sb[-1]) & (tb > sa[0]))  # not wholly past the student's tokens of the segment
        ok_j, ok_k = overlaps & (j < len(s)), overlaps & (k >= 0)
        start_to[t[ok_j]] = s[j[ok_j]]
        end_to[t[ok_k]] = s[k[ok_k]]
    return start_to, end_to


def carry(p_start, p_end, start_to, end_to, n_student):
    """The teacher's (teacher positions,) start and end probabilities as (n_student,) ones: each student
    position's sum of the teacher probabilities mapped to it."""
    return (np.bincount(start_to, weights=p_start, minlength=n_student),
            np.bincount(end_to, weights=p_end, minlength=n_student))


class PairedWindow(NamedTuple):
    """A student window and the teacher's window over the same question and stretch of context."""
    student_ids: np.ndarray  # (Ls,) what the feature store holds for this window
    student: Positions
    teacher_ids: np.ndarray  # (Lt,)
    teacher_types: object  # (Lt,) int8 or None
    teacher: Positions
    start_to: np.ndarray  # (Lt,) position_map of the two
    end_to: np.ndarray
    cut: bool  # the teacher's tokens of the stretch did not all fit its positions


class TokenBridge:
    """Both tokenizers and the window settings: `pair(examples)` gives the paired windows of a list of
    examples, the student's exactly as the feature store cuts them (same tokenizer, same settings)."""

    def __init__(self, student_tokenizer, teacher_tokenizer, fcfg: FeaturizerConfig, teacher_max_len: int):
        self.student, self.teacher, self.fcfg = student_tokenizer, teacher_tokenizer, fcfg
        self.s_layout, self.t_layout = pair_layout(student_tokenizer), pair_layout(teacher_tokenizer)
        self.teacher_max_len = teacher_max_len

    def questions(self, tokenizer, examples):
        """Each question's (ids, trimmed char offsets), as the windows take it: leading spaces stripped (as
        features.encode does) and cut to --max-question-len tokens."""
        texts = [ex.question.lstrip() for ex in examples]
        n = self.fcfg.max_question_len
        return [(np.asarray(e.ids[:n], np.int64), token_offsets(q, e)[:n])
                for q, e in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False))]

    def pair(self, examples) -> list:
        features = featurize(examples, self.student, self.fcfg, with_labels=False, with_offsets=True)
        s_questions, t_questions = self.questions(self.student, examples), self.questions(self.teacher, examples)
        contexts = {}  # the teacher's (ids, offsets) of each distinct context, tokenized whole once
        for ex in examples:
            if id(ex.context) not in contexts:
                contexts[id(ex.context)] = ex.context
        keys = list(contexts)
        encodings = self.teacher.encode_batch([contexts[k] for k in keys], add_special_tokens=False)
        t_contexts = {k: (np.asarray(e.ids, np.int64), token_offsets(contexts[k], e)) for k, e in zip(keys, encodings)}
        return [self._pair(f, s_questions[f.example_index], t_questions[f.example_index],
                           t_contexts[id(examples[f.example_index].context)]) for f in features]

    def _pair(self, f, s_question, t_question, t_context) -> PairedWindow:
        lay = self.t_layout
        n_q = len(s_question[0])
        ctx_off = f.offsets[f.n_prefix: len(f.input_ids) - len(self.s_layout.after)]
        student = positions(self.s_layout, s_question[1], ctx_off)
        assert len(student.seg) == len(f.input_ids) and f.n_prefix == n_q + len(self.s_layout.before) + len(
            self.s_layout.between), "the student's questions are not cut as features.featurize cuts them"
        ids, offsets = t_context
        c0, c1 = (int(ctx_off[0, 0]), int(ctx_off[-1, 1])) if len(ctx_off) else (0, 0)
        inside = np.flatnonzero((offsets[:, 0] >= c0) & (offsets[:, 1] <= c1)) if len(ctx_off) else np.zeros(0, int)
        room = self.teacher_max_len - len(t_question[0]) - lay.n_special
        cut = len(inside) > room
        inside = inside[:room]
        t_ids = np.concatenate([lay.before, t_question[0], lay.between, ids[inside], lay.after]).astype(np.int64)
        teacher = positions(lay, t_question[1], offsets[inside])
        start_to, end_to = position_map(student, teacher)
        return PairedWindow(f.input_ids, student, t_ids, lay.type_ids(len(t_question[0]), len(inside)), teacher, start_to,
                            end_to, cut)
