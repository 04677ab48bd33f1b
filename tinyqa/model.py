"""The RoBERTa encoder and extractive-QA head, written out by hand.

Follows `transformers/models/roberta/modeling_roberta.py` (RobertaForQuestionAnswering) numerically,
which in turn follows Liu et al. 2019, "RoBERTa" and Devlin et al. 2018, "BERT". Notable:
- positions start at pad_token_id + 1 and pad tokens keep position pad_token_id (RoBERTa's quirk);
- post-LayerNorm residual blocks with exact (erf) GELU, as in BERT;
- attention through torch's scaled_dot_product_attention with a boolean padding mask;
- `forward(input_ids, attention_mask)` is all there is: losses live in `tinyqa/losses.py`.
Module names are our own and short; `tinyqa/weights.py` maps them to the HF checkpoint keys.
"""
import json
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RobertaConfig:
    """The fields of a HF RoBERTa `config.json` that shape the model, under their HF names."""
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    position_embedding_type: str = "absolute"

    def __post_init__(self):
        # Refuse what this encoder does not implement instead of silently computing something else.
        if self.hidden_act != "gelu":
            raise ValueError(f"config: hidden_act={self.hidden_act!r} is not supported (only 'gelu', the exact erf GELU)")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"config: position_embedding_type={self.position_embedding_type!r} is not supported "
                             "(only 'absolute')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "RobertaConfig":
        known = {f.name for f in fields(cls)}
        if d.get("model_type", "roberta") not in ("roberta", "xlm-roberta"):
            raise ValueError(f"config: model_type={d['model_type']!r} is not a RoBERTa model")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("config: decoder / cross-attention RoBERTa is not supported (encoder only)")
        return cls(**{k: v for k, v in d.items() if k in known})  # unknown keys (architectures, ...) ignored

    @classmethod
    def from_json(cls, path) -> "RobertaConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        # What transformers needs to pick the architecture back up from our config.json.
        return {"architectures": ["RobertaForQuestionAnswering"], "model_type": "roberta", **d}


class QAOutput(NamedTuple):
    start_logits: torch.Tensor  # (B, L) float32
    end_logits: torch.Tensor  # (B, L) float32
    hidden_states: Optional[tuple] = None  # embeddings output, then each layer's output: (B, L, H) each


class Embeddings(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids):
        # RoBERTa numbers positions from pad_token_id + 1 and gives pad tokens position pad_token_id,
        # so with pad_token_id = 1:  ids  <s> Who ? </s> <pad> <pad>
        #                            pos   2   3  4   5    1     1
        # This is why max_position_embeddings is 514 = 512 + 2. Like transformers, the mask comes from
        # the pad id itself (not attention_mask), so padded batches give every row the same positions.
        not_pad = (input_ids != self.pad_token_id).int()  # (B, L)
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id  # (B, L)
        # type_vocab_size is 1 for RoBERTa: every token takes token-type row 0.
        x = self.word(input_ids) + self.token_type.weight[0] + self.position(positions)  # (B, L, H)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_dropout = cfg.attention_probs_dropout_prob

    def forward(self, x, mask):
        B, L, H = x.shape
        hs = H // self.n_head
        # (B, L, H) -> (B, L, nh, hs) -> (B, nh, L, hs)
        q = self.query(x).view(B, L, self.n_head, hs).transpose(1, 2)
        k = self.key(x).view(B, L, self.n_head, hs).transpose(1, 2)
        v = self.value(x).view(B, L, self.n_head, hs).transpose(1, 2)
        # mask: (B, 1, 1, L) bool, True where a key may be attended to. Padded query rows still see the
        # real keys, so no row is all -inf and SDPA never produces NaN.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, H)  # (B, nh, L, hs) -> (B, L, H)
        return self.out(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))  # exact erf GELU, not the tanh approximation


class Layer(nn.Module):
    """Post-LN block: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, mask):
        x = self.ln_attn(x + self.drop(self.attn(x, mask)))
        return self.ln_ffn(x + self.drop(self.ffn(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids, attention_mask, output_hidden_states=False):
        mask = attention_mask.bool()[:, None, None, :]  # (B, L) -> (B, 1, 1, L), broadcast over heads and queries
        x = self.embeddings(input_ids)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden.append(x)
        return x, (tuple(hidden) if output_hidden_states else None)


class RobertaForQA(nn.Module):
    """RoBERTa encoder + `qa_outputs` (Linear(H, 2)) giving start and end logits per token."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.qa_outputs = nn.Linear(cfg.hidden_size, 2)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # BERT's initialisation (normal(0, initializer_range), zero biases, unit LayerNorm): what a fresh
        # QA head on a base LM checkpoint gets, and what tests with random weights start from.
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask, output_hidden_states=False) -> QAOutput:
        x, hidden = self.encoder(input_ids, attention_mask, output_hidden_states)  # (B, L, H)
        logits = self.qa_outputs(x).float()  # (B, L, 2), float32 whatever the compute dtype
        start, end = logits.unbind(dim=-1)  # (B, L) each
        return QAOutput(start.contiguous(), end.contiguous(), hidden)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_token(cfg: RobertaConfig, seq_len: int) -> float:
    """Forward FLOPs (2 per multiply-add, matmuls only) per token of a window of seq_len tokens: what the
    benchmarks divide by time to compare against the machine's matmul peak."""
    H, I, N = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = 2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq_len * H  # Q, K, V, out, up, down + QK^T and AV
    return N * per_layer + 2 * 2 * H  # + qa_outputs
