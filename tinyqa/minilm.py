"""MiniLMv2's multi-head self-attention relation distillation: which teacher layer, how many relation heads,
and the queries, keys and values of one layer, captured as the model runs.

Follows Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing
Pretrained Transformers" (section 3; its training code was never released). The student's LAST layer learns
the query-query, key-key and value-value relations of one teacher layer: the last for base-size teachers,
an upper-middle one for large ones, which the paper found to teach better (here 7/8 of the depth: layer 21
of 24). Relations are taken over relation heads shared by both models (the paper uses more of them than
attention heads; here the most, up to 64, that divide both widths into heads of 4 features or more), so the
student may have another width, depth and attention-head count than its teacher, unlike TinyBERT's
layer-to-layer stage. The loss is
tinyqa/losses.py's `minilm_loss`; `train_distill.py --stage minilmv2` runs it.
"""
import math
from contextlib import contextmanager

import torch.nn as nn

from .errors import TinyQAError
from .model import EncoderForQA


def default_teacher_layer(n_layers: int) -> int:
    """The 1-based teacher layer: an upper-middle one for deep teachers (21 of 24), else the last."""
    return round(n_layers * 7 / 8) if n_layers >= 24 else n_layers


def default_relation_heads(teacher_width: int, student_width: int) -> int:
    """The most relation heads, up to 64, into which both widths split evenly with at least 4 features a
    head (1024 and 384: 64 heads of 16 and 6 features; 128 and 64: 16 of 8 and 4); more heads, finer
    relations, but a head of one or two features relates tokens by little more than a sign."""
    common, narrow = math.gcd(teacher_width, student_width), min(teacher_width, student_width)
    return max([a for a in range(1, 65) if common % a == 0 and narrow // a >= 4] or [1])


def check_relation_setup(teacher_cfg, student_cfg, teacher_layer=None, heads=None) -> tuple:
    """(teacher layer, relation heads) to use, refused with a clear message where they cannot work."""
    layer = teacher_layer or default_teacher_layer(teacher_cfg.num_hidden_layers)
    if not 1 <= layer <= teacher_cfg.num_hidden_layers:
        raise TinyQAError(f"--teacher-layer {layer}: the teacher has layers 1 to {teacher_cfg.num_hidden_layers}")
    heads = heads or default_relation_heads(teacher_cfg.hidden_size, student_cfg.hidden_size)
    for who, width in (("teacher", teacher_cfg.hidden_size), ("student", student_cfg.hidden_size)):
        if width % heads:
            raise TinyQAError(f"--relation-heads {heads}: the {who}'s width {width} does not split into {heads} "
                              "relation heads; choose a count that divides both widths")
    if teacher_cfg.relative_attention or student_cfg.relative_attention:
        raise TinyQAError("--stage minilmv2 reads queries, keys and values through their Linears; DeBERTa's "
                          "relative attention adds position terms they do not hold: use another family")
    return layer, heads


@contextmanager
def capture_qkv(model: EncoderForQA, layer: int):
    """with capture_qkv(model, layer) as qkv: model(...) -- qkv then holds that layer's (1-based) queries,
    keys and values, (B, L, H) each: the outputs of its query, key and value Linears, caught by forward hooks,
    so the model's forward stays as it is."""
    attn = model.encoder.layers[layer - 1].attn
    qkv = [None, None, None]
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: qkv.__setitem__(i, out))
             for i, m in enumerate((attn.query, attn.key, attn.value))]
    try:
        yield qkv
    finally:
        for h in hooks:
            h.remove()


class RelationStudent(nn.Module):
    """The student as the minilmv2 stage trains it: its forward returns its last layer's (q, k, v). What the
    relation loss does not reach (the last layer after its attention projections, and the QA head) is frozen
    for the stage: DDP needs every trainable parameter to get a gradient, and the prediction-layer stage that
    follows trains them."""

    def __init__(self, student: EncoderForQA):
        super().__init__()
        self.student = student
        last = student.encoder.layers[-1]
        for module in (last.attn.out, last.ln_attn, last.ffn, last.ln_ffn, student.qa_outputs):
            module.requires_grad_(False)

    @property
    def config(self):
        return self.student.config

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        with capture_qkv(self.student, self.student.config.num_hidden_layers) as qkv:
            self.student(input_ids, attention_mask, token_type_ids)
        return qkv
