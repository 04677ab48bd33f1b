"""TinyBERT's intermediate-layer distillation: which teacher layer each student layer learns from, the
projection between their widths, and a student made of a selection of the teacher's own layers.

Follows Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding" (section 3.1 and
its reference `task_distill.py`), as deepset did for tinyroberta-squad2-step1 ("inspired by the TinyBERT
paper"). The losses themselves are in tinyqa/losses.py; `train_distill.py --stage intermediate` runs them.

The uniform layer map: with k = teacher layers / student layers, student layer i (1-based) learns the
hidden state AND the attention scores of teacher layer i * k, and the embedding output (hidden state 0)
learns the teacher's. 24 -> 6 (roberta-large to tinyroberta): k = 4, layers 4, 8, 12, 16, 20, 24;
12 -> 6: 2, 4, 6, 8, 10, 12. In TinyBERT's 0-based code the attention of student layer j is teacher
layer (j + 1) * k - 1 and the hidden state i is teacher_reps[i * k] (index 0 = embeddings): the same map.
"""
from dataclasses import replace

import torch
import torch.nn as nn

from .errors import TinyQAError
from .model import EncoderConfig, EncoderForQA


def uniform_layer_map(n_teacher: int, n_student: int, advice=", or give --layer-map") -> list:
    """[k, 2k, ..., n_teacher]: the 1-based teacher layer for each student layer."""
    if n_student < 1 or n_teacher % n_student:
        raise TinyQAError(f"the teacher's {n_teacher} layer{'s' * (n_teacher > 1)} cannot be split evenly among "
                          f"{n_student} student layers: choose a student depth that divides {n_teacher}{advice}")
    k = n_teacher // n_student
    return [k * (i + 1) for i in range(n_student)]


def check_layer_map(teacher: EncoderConfig, student: EncoderConfig, layer_map=None) -> list:
    """The map to use (the given one, else the uniform one), refused with a clear message where the two
    models cannot be paired: attention scores are compared head by head, so the head counts must agree."""
    if teacher.num_attention_heads != student.num_attention_heads:
        raise TinyQAError(f"the teacher has {teacher.num_attention_heads} attention heads per layer and the student "
                          f"{student.num_attention_heads}: TinyBERT's attention loss compares them head by head, "
                          "so they must be equal (choose a student config with the teacher's head count)")
    if layer_map is None:
        return uniform_layer_map(teacher.num_hidden_layers, student.num_hidden_layers)
    if len(layer_map) != student.num_hidden_layers:
        raise TinyQAError(f"--layer-map names {len(layer_map)} teacher layers but the student has "
                          f"{student.num_hidden_layers}: give one per student layer")
    if max(layer_map) > teacher.num_hidden_layers:
        raise TinyQAError(f"--layer-map {','.join(map(str, layer_map))}: the teacher has only "
                          f"{teacher.num_hidden_layers} layer{'s' * (teacher.num_hidden_layers > 1)}")
    return list(layer_map)


class ProjectedStudent(nn.Module):
    """The student with TinyBERT's `fit_dense`: one Linear(student width, teacher width) shared by the
    embedding output and every layer's hidden state (an identity when the widths are equal). One module, so
    that the optimizer gets the projection from the first step and DDP averages its gradients too. Only the
    student is saved as the stage's model; the projection lives in the training state for --resume."""

    def __init__(self, student: EncoderForQA, teacher_width: int):
        super().__init__()
        self.student = student
        width = student.config.hidden_size
        self.project = nn.Linear(width, teacher_width) if width != teacher_width else nn.Identity()
        if isinstance(self.project, nn.Linear):
            student._init_weights(self.project)  # normal(0, initializer_range), zero bias, as the student's own

    @property
    def config(self):
        return self.student.config

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """(projected hidden states: embeddings then each layer, (B, L, H_teacher) each; scores of every
        layer, (B, nh, L, L) each)."""
        out = self.student(input_ids, attention_mask, token_type_ids, output_hidden_states=True, output_scores=True)
        return [self.project(h) for h in out.hidden_states], out.attention_scores


@torch.no_grad()
def teacher_targets(teacher, layer_map, input_ids, attention_mask, token_type_ids=None):
    """The teacher's hidden states (embeddings, then the mapped layers) and the mapped layers' scores; only
    those layers' scores are computed."""
    out = teacher(input_ids, attention_mask, token_type_ids, output_hidden_states=True,
                  output_scores=[m - 1 for m in layer_map])
    hidden = [out.hidden_states[0]] + [out.hidden_states[m] for m in layer_map]
    scores = [out.attention_scores[m - 1] for m in layer_map]
    return hidden, scores


def student_from_teacher_layers(teacher: EncoderForQA, n_layers: int) -> tuple:
    """A student of the teacher's width made of its embeddings, n_layers of its layers (the uniform map's:
    layers k, 2k, ..., all 1-based) and its QA head: the usual start when no general-distilled student
    exists (DistilBERT and PKD initialise from teacher layers too). Returns (student, the copied layers)."""
    layers = uniform_layer_map(teacher.config.num_hidden_layers, n_layers, " (--student-layers)")
    student = EncoderForQA(replace(teacher.config, num_hidden_layers=n_layers))
    state = {}
    for name, value in teacher.state_dict().items():
        if name.startswith("encoder.layers."):
            i = int(name.split(".")[2])
            if i + 1 not in layers:
                continue
            name = name.replace(f"encoder.layers.{i}.", f"encoder.layers.{layers.index(i + 1)}.", 1)
        state[name] = value.detach().clone()
    student.load_state_dict(state, strict=True)  # every student tensor comes from the teacher
    return student, layers
