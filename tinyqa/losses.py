"""Losses for extractive QA: span cross-entropy, prediction-layer distillation, and TinyBERT's
intermediate-layer losses (hidden states and attention scores).

The distillation recipe is the one haystack used to train tinyroberta (deepset, "TinyRoBERTa" model
card; Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):

    loss = w * T^2 * [KL(p_t^start || p_s^start) + KL(p_t^end || p_s^end)]  +  (1 - w) * (CE_start + CE_end) / 2

where p = softmax(logits / T) over the sequence positions of one window, KL is summed over positions
and averaged over the batch. Why T^2: softening by T scales the soft-target gradients by 1/T^2, so the
product keeps the KD term's gradient magnitude independent of T (Hinton et al., section 2).

Padding is masked out of every softmax here, for student and teacher alike (a deliberate choice:
transformers' RobertaForQuestionAnswering does not mask pad positions in its CE). Masking makes the loss
independent of how much a batch is padded, so length-sorted batches, gradient accumulation and DDP
shards all optimise the same objective; pad positions carry no answer, so nothing is lost.
"""
import torch
import torch.nn.functional as F

# A finite "minus infinity": exp() of it is exactly 0 in float32, yet 0 * it stays 0 (with -inf it is NaN).
_MASKED = -1e9


def masked(logits, attention_mask):
    """Pad positions pushed to _MASKED so that softmax gives them exactly zero mass. (B, L) float32."""
    return logits.float().masked_fill(attention_mask == 0, _MASKED)


def span_ce_loss(start_logits, end_logits, start_positions, end_positions, attention_mask):
    """(CE_start + CE_end) / 2 over the batch, pad positions masked."""
    ce_start = F.cross_entropy(masked(start_logits, attention_mask), start_positions)
    ce_end = F.cross_entropy(masked(end_logits, attention_mask), end_positions)
    return (ce_start + ce_end) / 2


def kd_loss(student_logits, teacher, attention_mask, temperature, teacher_probabilities=False):
    """KL(teacher || student) of the temperature-softened position distributions, summed over positions,
    averaged over the batch (F.kl_div's 'batchmean'). Not yet multiplied by T^2. teacher: its logits (B, L),
    or with teacher_probabilities its distribution at T already (a teacher with another tokenizer, whose
    probabilities were carried to the student's tokens: tinyqa/token_map.py; zero beyond each window)."""
    log_p_student = F.log_softmax(masked(student_logits, attention_mask) / temperature, dim=-1)  # (B, L)
    if teacher_probabilities:  # zeros allowed: they add nothing (F.kl_div takes 0 * log 0 as 0)
        return F.kl_div(log_p_student, teacher.float(), log_target=False, reduction="batchmean")
    log_p_teacher = F.log_softmax(masked(teacher, attention_mask) / temperature, dim=-1)  # (B, L)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


def distillation_loss(student_start, student_end, teacher_start, teacher_end, start_positions, end_positions,
                      attention_mask, weight=0.75, temperature=1.5, teacher_probabilities=False):
    """(total, kd part, ce part): total = weight * T^2 * (KL_start + KL_end) + (1 - weight) * CE.
    teacher_start/end: logits, or with teacher_probabilities distributions at T (see kd_loss)."""
    kd = kd_loss(student_start, teacher_start, attention_mask, temperature, teacher_probabilities) + \
        kd_loss(student_end, teacher_end, attention_mask, temperature, teacher_probabilities)
    ce = span_ce_loss(student_start, student_end, start_positions, end_positions, attention_mask)
    total = weight * temperature ** 2 * kd + (1 - weight) * ce
    return total, kd, ce


# --- intermediate-layer distillation (Jiao et al. 2020, "TinyBERT", eqs. 7-9; its task_distill.py)
#
# TinyBERT takes F.mse_loss's mean over every entry of the (B, L, H) hidden states and the (B, nh, L, L)
# scores of windows all padded to max_seq_length, padded entries included (it zeroes the scores of padded
# keys first, so they add 0 but still count). So every window weighs the same, and within a window the
# padding dilutes the error. Here each window's error is averaged over its REAL entries only (real tokens
# for hidden states, (real query, real key) pairs for scores), and windows are then averaged: the same
# per-window weighting, but the loss no longer depends on how much a window happens to be padded, and
# length-sorted batches, accumulation and DDP shards (which weight micro-batches by their window counts,
# as the losses above need) all optimise the same objective.

def hidden_mse(student_hidden, teacher_hidden, attention_mask):
    """Mean over windows of each window's mean squared error over its real tokens' features: (B, L, H)
    each (the student's already projected to the teacher's width), attention_mask (B, L)."""
    valid = attention_mask.bool()[:, :, None]  # (B, L, 1)
    diff = torch.where(valid, student_hidden.float() - teacher_hidden.float(), 0.0)
    per_window = diff.pow(2).sum(dim=(1, 2)) / (valid.sum(dim=(1, 2)) * student_hidden.shape[-1])  # (B,)
    return per_window.mean()


def attention_mse(student_scores, teacher_scores, attention_mask):
    """Mean over windows of each window's mean squared error of the pre-softmax attention scores
    (B, nh, L, L), over heads and the (query, key) pairs where both tokens are real; a padded key's score
    (-inf in effect) would otherwise dominate."""
    real = attention_mask.bool()
    valid = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, L, L)
    diff = torch.where(valid, student_scores.float() - teacher_scores.float(), 0.0)
    per_window = diff.pow(2).sum(dim=(1, 2, 3)) / (valid.sum(dim=(1, 2, 3)) * student_scores.shape[1])  # (B,)
    return per_window.mean()


def intermediate_loss(student_hidden, teacher_hidden, student_scores, teacher_scores, attention_mask,
                      weights=(1.0, 1.0, 1.0)):
    """(total, embedding part, hidden part, attention part) of TinyBERT's intermediate-layer stage, summed
    over the mapped layers as TinyBERT does: student_hidden[0] (the projected embedding output) learns
    teacher_hidden[0]; student_hidden[i] and student_scores[i - 1] learn teacher_hidden[i] and
    teacher_scores[i - 1] for i = 1 .. n (the caller has already picked the teacher's mapped layers)."""
    emb = hidden_mse(student_hidden[0], teacher_hidden[0], attention_mask)
    hid = sum(hidden_mse(s, t, attention_mask) for s, t in zip(student_hidden[1:], teacher_hidden[1:]))
    att = sum(attention_mse(s, t, attention_mask) for s, t in zip(student_scores, teacher_scores))
    total = weights[0] * emb + weights[1] * hid + weights[2] * att
    return total, emb, hid, att


# --- multi-head self-attention relation distillation (Wang et al. 2021, "MiniLMv2", section 3)
#
# A layer's queries (likewise keys, values) of all attention heads, (B, L, H), are regrouped into A relation
# heads of H / A features each; teacher and student use the same A, so their widths and attention-head counts
# may differ. The query-query relation of head a is, for every query token t, the distribution
# softmax(Q_a Q_a^T / sqrt(H / A)) over the tokens; the student learns the teacher's by KL(teacher || student),
# averaged over relation heads and the window's real tokens (padded keys are left out of every softmax,
# padded queries out of the average), then over windows. The loss is the sum of the QQ, KK and VV terms.

def relation_heads(x, heads):
    """(B, L, H) -> (B, A, L, d_r): the hidden vectors regrouped into A relation heads of d_r = H / A, fp32,
    each scaled by d_r ** -0.25, so that a product of two is already the scaled dot product (the scale then
    costs a pass over (L, d_r) values, not over the (L, L) map)."""
    B, L, H = x.shape
    return x.float().view(B, L, heads, H // heads).transpose(1, 2) * (H // heads) ** -0.25


def relation_scores(x, attention_mask):
    """x_a x_a^T per relation head (x from relation_heads: scaled dot products), (B, A, L, d_r) -> (B, A, L,
    L), padded keys at -1e9. In fp32 even under bf16/fp16 autocast, which would round every score (to ~3
    digits in bf16) before the softmax: the targets are the teacher's relations, not a rounded copy."""
    with torch.autocast(x.device.type, enabled=False):
        scores = x @ x.transpose(-1, -2)
    return scores.masked_fill_(~attention_mask.bool()[:, None, None, :], _MASKED)  # in place: a pass saved


def relations(x, attention_mask, heads):
    """log softmax(x_a x_a^T / sqrt(d_r)) per relation head a: (B, L, H) -> (B, A, L, L), padded keys at -inf
    in effect (probability 0)."""
    return F.log_softmax(relation_scores(relation_heads(x, heads), attention_mask), dim=-1)


def relation_kl(teacher, student, attention_mask, heads):
    """Mean over windows of KL(teacher relation || student relation), summed over keys, averaged over the
    relation heads and the window's real query tokens. teacher (B, L, H_t), student (B, L, H_s).

    Computed as KL = sum_k p_k log p_k - sum_k p_k s_k + logsumexp_k s_k, with p the teacher's relation and s
    the student's scores (log q = s - logsumexp s, and the p of a query sum to 1): the teacher's side needs
    no gradient, and sum_k p_k s_k = x_q . (P X)_q is a matmul, so autograd keeps one (L, L) map per head
    of the student instead of the chain log_softmax, exp, subtract, multiply. The (L, L) maps are what this
    loss costs: each pass over them saved is time saved."""
    with torch.no_grad():
        log_p = relations(teacher, attention_mask, heads)
        p = log_p.exp()
        neg_entropy = (p * log_p).sum(dim=-1)  # (B, A, L)
    x = relation_heads(student, heads)  # (B, A, L, d_r)
    with torch.autocast(x.device.type, enabled=False):
        cross = ((p @ x) * x).sum(dim=-1)  # (B, A, L): sum_k p_k s_k
    kl = neg_entropy - cross + torch.logsumexp(relation_scores(x, attention_mask), dim=-1)  # (B, A, L)
    real = attention_mask.float()  # (B, L)
    per_window = (kl.mean(dim=1) * real).sum(dim=1) / real.sum(dim=1)  # (B,)
    return per_window.mean()


def minilm_loss(teacher_qkv, student_qkv, attention_mask, heads):
    """(total, QQ part, KK part, VV part): the relation KL of queries, keys and values, summed."""
    parts = [relation_kl(t, s, attention_mask, heads) for t, s in zip(teacher_qkv, student_qkv)]
    return sum(parts), *parts
