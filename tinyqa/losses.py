"""Losses for extractive QA: span cross-entropy and prediction-layer distillation.

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


def kd_loss(student_logits, teacher_logits, attention_mask, temperature):
    """KL(teacher || student) of the temperature-softened position distributions, summed over positions,
    averaged over the batch (F.kl_div's 'batchmean'). Not yet multiplied by T^2."""
    log_p_student = F.log_softmax(masked(student_logits, attention_mask) / temperature, dim=-1)  # (B, L)
    log_p_teacher = F.log_softmax(masked(teacher_logits, attention_mask) / temperature, dim=-1)  # (B, L)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


def distillation_loss(student_start, student_end, teacher_start, teacher_end, start_positions, end_positions,
                      attention_mask, weight=0.75, temperature=1.5):
    """(total, kd part, ce part): total = weight * T^2 * (KL_start + KL_end) + (1 - weight) * CE."""
    kd = kd_loss(student_start, teacher_start, attention_mask, temperature) + \
        kd_loss(student_end, teacher_end, attention_mask, temperature)
    ce = span_ce_loss(student_start, student_end, start_positions, end_positions, attention_mask)
    total = weight * temperature ** 2 * kd + (1 - weight) * ce
    return total, kd, ce
