"""The encoders of the model card's family (RoBERTa, BERT, ELECTRA, DeBERTa-v3) and the extractive-QA head,
written out by hand, one class per stage.

Follows transformers' `modeling_roberta.py`, `modeling_bert.py`, `modeling_electra.py` and
`modeling_deberta_v2.py` numerically (Liu et al. 2019 "RoBERTa"; Devlin et al. 2018 "BERT"; Clark et al.
2020 "ELECTRA"; He et al. 2021 "DeBERTa" and "DeBERTaV3"). All four are post-LayerNorm BERT encoders with
exact (erf) GELU and a `qa_outputs` Linear(H, 2); MiniLMv2 checkpoints are plain BERT or RoBERTa ones.
What differs sits in three places, each visible in one spot:
- the embeddings (`Embeddings`): RoBERTa numbers positions from pad_token_id + 1; BERT and ELECTRA use
  0..L-1 and add a token-type (segment) embedding; ELECTRA-Small projects its 128-wide embeddings up to
  the encoder's width; DeBERTa-v3 has no absolute positions and multiplies its embeddings by the mask;
- the attention bias (`SelfAttention` and `disentangled_bias`): a padding mask for the first three, plus
  DeBERTa's relative-position terms, which SDPA takes as an additive float mask;
- the checkpoint key names: `tinyqa/weights.py`, one table per family.
`forward(input_ids, attention_mask, token_type_ids=None)` is all there is: losses live in `tinyqa/losses.py`.
Module names are our own and short; `tinyqa/weights.py` maps them to the HF checkpoint keys.
"""
import itertools
import json
import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# The families' own values for the config fields left at None: those of each family's published
# checkpoints (roberta-base, bert-base-uncased, electra-*-discriminator, deberta-v3-base).
FAMILY_DEFAULTS = {
    "roberta": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "bert": dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                 pad_token_id=0),
    "electra": dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                    pad_token_id=0, embedding_size=128),
    "deberta-v2": dict(vocab_size=128100, max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7,
                       pad_token_id=0, position_biased_input=False, relative_attention=True, position_buckets=256,
                       pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm"),
}
# The largest size of any dimension: two of them make a weight matrix whose bytes (4 * 2**60) a 64-bit count
# still holds (a larger one cannot be built, not even on the meta device), far above any published model's.
MAX_SIZE = 2**30
# What transformers assumes for DeBERTa keys a config.json leaves out (DebertaV2Config's defaults describe
# DeBERTa-v2 without relative attention). `from_dict` reads a file as transformers would, so such a file is
# refused below rather than silently read as DeBERTa-v3.
DEBERTA_ABSENT = dict(relative_attention=False, position_biased_input=True, pos_att_type=[], position_buckets=-1,
                      share_att_key=False, norm_rel_ebd="none")
ARCHITECTURES = {"roberta": "RobertaForQuestionAnswering", "bert": "BertForQuestionAnswering",
                 "electra": "ElectraForQuestionAnswering", "deberta-v2": "DebertaV2ForQuestionAnswering"}
# The fields each family's config.json holds (what `to_dict` writes back).
COMMON_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id",
                 "eos_token_id", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "initializer_range")
FAMILY_FIELDS = {"roberta": ("position_embedding_type",), "bert": ("position_embedding_type",),
                 "electra": ("position_embedding_type", "embedding_size"),
                 "deberta-v2": ("position_biased_input", "relative_attention", "max_relative_positions",
                                "position_buckets", "pos_att_type", "share_att_key", "norm_rel_ebd")}


@dataclass
class EncoderConfig:
    """The fields of a HF `config.json` that shape the model, under their HF names, for all four families.
    Fields left at None take the family's value (FAMILY_DEFAULTS)."""
    model_type: str = "roberta"  # roberta (xlm-roberta), bert, electra, deberta-v2 (DeBERTa-v3 checkpoints)
    vocab_size: Optional[int] = None
    hidden_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: Optional[int] = None
    type_vocab_size: Optional[int] = None
    layer_norm_eps: Optional[float] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    position_embedding_type: str = "absolute"
    # ELECTRA: embeddings narrower than the encoder, projected up (None: hidden_size, except ELECTRA's 128)
    embedding_size: Optional[int] = None
    # DeBERTa: disentangled attention over log-bucketed relative positions
    position_biased_input: Optional[bool] = None
    relative_attention: Optional[bool] = None
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    position_buckets: Optional[int] = None
    pos_att_type: Optional[list] = None
    share_att_key: Optional[bool] = None
    norm_rel_ebd: Optional[str] = None
    conv_kernel_size: int = 0

    def __post_init__(self):
        if not isinstance(self.model_type, str) or self.family not in FAMILY_DEFAULTS:
            raise ValueError(f"config: model_type={self.model_type!r} is not supported "
                             f"(roberta, xlm-roberta, bert, electra, deberta-v2)")
        for k, v in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        if isinstance(self.pos_att_type, str):  # "p2c|c2p", as older DeBERTa configs write it
            self.pos_att_type = [x.strip() for x in self.pos_att_type.lower().split("|")]
        self._check_values()
        # Refuse what this encoder does not implement instead of silently computing something else.
        refuse = []
        if self.hidden_act != "gelu":
            refuse.append(f"hidden_act={self.hidden_act!r} is not supported (only 'gelu', the exact erf GELU)")
        if self.hidden_size % self.num_attention_heads:
            refuse.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                          f"{self.num_attention_heads}")
        if self.family != "deberta-v2" and self.position_embedding_type != "absolute":
            refuse.append(f"position_embedding_type={self.position_embedding_type!r} is not supported "
                          "(only 'absolute')")
        if self.family != "electra" and self.embedding_size != self.hidden_size:
            refuse.append(f"embedding_size {self.embedding_size} != hidden_size {self.hidden_size} is not "
                          f"supported for {self.model_type} (only ELECTRA projects its embeddings)")
        if self.family == "deberta-v2":  # DeBERTa-v3's layout, the only one implemented
            wanted = dict(relative_attention=True, position_biased_input=False, position_buckets=256,
                          share_att_key=True, norm_rel_ebd="layer_norm", conv_kernel_size=0)
            refuse += [f"{k}={getattr(self, k)!r} is not supported (DeBERTa-v3 has {v!r})" for k, v in wanted.items()
                       if getattr(self, k) != v or (type(v) is int and type(getattr(self, k)) is not int)]  # 256.0
            if sorted(self.pos_att_type or []) != ["c2p", "p2c"]:
                refuse.append(f"pos_att_type={self.pos_att_type!r} is not supported (DeBERTa-v3 has ['p2c', 'c2p'])")
        if refuse:
            raise ValueError("config: " + "; ".join(refuse))

    def _check_values(self):
        """Values that make no model: sizes that are not positive whole numbers, ids outside the vocabulary,
        rates outside [0, 1), a LayerNorm epsilon that is not a positive number. Refused by name, before
        a division by zero or a shape error deep inside the model could say it less clearly."""
        def whole(v, least):
            return isinstance(v, int) and not isinstance(v, bool) and least <= v <= MAX_SIZE
        refuse = [f"{k}={getattr(self, k)!r} must be a whole number from 1 to 2**30" for k in
                  ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "max_position_embeddings", "embedding_size") if not whole(getattr(self, k), 1)]
        refuse += [f"type_vocab_size={self.type_vocab_size!r} must be a whole number from 0 to 2**30"] \
            if not whole(self.type_vocab_size, 0) else []
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, k)
            if v is not None and not (whole(v, 0) and (not whole(self.vocab_size, 1) or v < self.vocab_size)):
                refuse.append(f"{k}={v!r} must be a token id in [0, vocab_size)")
        real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not (real(getattr(self, k)) and 0 <= getattr(self, k) < 1):
                refuse.append(f"{k}={getattr(self, k)!r} must be a number in [0, 1)")
        if not (real(self.layer_norm_eps) and self.layer_norm_eps > 0):
            refuse.append(f"layer_norm_eps={self.layer_norm_eps!r} must be a positive number")
        if not (real(self.initializer_range) and self.initializer_range >= 0):
            refuse.append(f"initializer_range={self.initializer_range!r} must be a number >= 0")
        if not whole(self.max_relative_positions, -MAX_SIZE):
            refuse.append(f"max_relative_positions={self.max_relative_positions!r} must be a whole number up to 2**30")
        if self.family != "deberta-v2" and self.relative_attention:
            refuse.append(f"relative_attention={self.relative_attention!r} is DeBERTa's; {self.model_type} has none")
        if not refuse and self.family == "roberta" and self.max_position_embeddings <= self.pad_token_id + 1:
            refuse.append(f"max_position_embeddings={self.max_position_embeddings} leaves no position for a token "
                          f"(RoBERTa numbers them from pad_token_id + 1 = {self.pad_token_id + 1})")
        if refuse:
            raise ValueError("config: " + "; ".join(refuse))

    @property
    def family(self) -> str:
        return "roberta" if self.model_type == "xlm-roberta" else self.model_type

    @property
    def max_window_len(self) -> int:
        """The longest window (special tokens included) the model takes. RoBERTa spends positions 0 ..
        pad_token_id on padding (its positions start at pad_token_id + 1: 514 rows hold 512 tokens); the
        others number from 0, and DeBERTa's relative buckets are calibrated to max_position_embeddings."""
        if self.family == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @property
    def max_relative(self) -> int:
        """DeBERTa: the distance the log buckets reach (max_relative_positions, else max_position_embeddings)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        d = dict(d)
        d.setdefault("model_type", "roberta")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("config: decoder / cross-attention models are not supported (encoder only)")
        if d["model_type"] == "electra" and any("Generator" in a or a in ("ElectraForMaskedLM", "ElectraForCausalLM")
                                                for a in d.get("architectures") or []):
            raise ValueError(f"config: architectures={d['architectures']} is an ELECTRA generator; the card's "
                             "models start from the discriminator (e.g. google/electra-base-discriminator)")
        if d["model_type"] == "deberta-v2":
            if d.get("pos_att_type", "") is None:
                d["pos_att_type"] = []
            sizes = d.get("attention_head_size"), d.get("num_attention_heads", 12), d.get("hidden_size", 768)
            if "attention_head_size" in d and not (all(type(x) is int for x in sizes)
                                                   and sizes[0] * sizes[1] == sizes[2]):
                raise ValueError("config: attention_head_size != hidden_size / num_attention_heads is not supported")
            d = {**DEBERTA_ABSENT, **d}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # unknown keys (architectures, ...) ignored

    @classmethod
    def from_json(cls, path) -> "EncoderConfig":
        with open(path) as f:
            try:
                d = json.load(f)
            except RecursionError:  # a ValueError like every other JSON its callers refuse
                raise ValueError("not usable JSON (nested too deeply)") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        keys = COMMON_FIELDS + FAMILY_FIELDS[self.family]
        # architectures and model_type: what transformers needs to pick the architecture back up.
        return {"architectures": [ARCHITECTURES[self.family]], "model_type": self.model_type,
                **{k: getattr(self, k) for k in keys}}


class QAOutput(NamedTuple):
    start_logits: torch.Tensor  # (B, L) float32
    end_logits: torch.Tensor  # (B, L) float32
    hidden_states: Optional[tuple] = None  # embeddings output, then each layer's output: (B, L, H) each
    attention_scores: Optional[tuple] = None  # per layer, the pre-softmax scores (B, nh, L, L), or None


class Embeddings(nn.Module):
    """Token (+ position) (+ token type) embeddings, LayerNorm, dropout: the first per-family difference."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.family, self.pad_token_id = cfg.family, cfg.pad_token_id
        E, H = cfg.embedding_size, cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, E, padding_idx=cfg.pad_token_id)
        self.position = None
        if cfg.family != "deberta-v2":  # DeBERTa-v3 knows positions only through its attention
            self.position = nn.Embedding(cfg.max_position_embeddings, E,
                                         padding_idx=cfg.pad_token_id if cfg.family == "roberta" else None)
        self.token_type = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size > 0 else None
        self.ln = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)
        self.project = nn.Linear(E, H) if E != H else None  # ELECTRA-Small: 128 -> 256

    def positions(self, input_ids):
        if self.family == "roberta":
            # RoBERTa numbers positions from pad_token_id + 1 and gives pad tokens position pad_token_id,
            # so with pad_token_id = 1:  ids  <s> Who ? </s> <pad> <pad>
            #                            pos   2   3  4   5    1     1
            # This is why max_position_embeddings is 514 = 512 + 2. Like transformers, the mask comes from
            # the pad id itself (not attention_mask), so padded batches give every row the same positions.
            not_pad = (input_ids != self.pad_token_id).int()  # (B, L)
            return torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id  # (B, L)
        return torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,) BERT, ELECTRA: 0 .. L-1

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        x = self.word(input_ids)  # (B, L, E)
        if self.token_type is not None:
            # BERT, ELECTRA: question tokens type 0, context type 1. RoBERTa's one row (type_vocab_size 1)
            # is added to every token, as is row 0 when no types are given (no lookup needed).
            one_row = token_type_ids is None or self.token_type.num_embeddings == 1
            x = x + (self.token_type.weight[0] if one_row else self.token_type(token_type_ids))
        if self.position is not None:
            x = x + self.position(self.positions(input_ids))
        x = self.ln(x)
        if self.family == "deberta-v2":
            x = x * attention_mask[:, :, None].to(x.dtype)  # DeBERTa zeroes the padding's embeddings
        x = self.drop(x)
        return self.project(x) if self.project is not None else x  # (B, L, H)


def relative_position_buckets(L: int, buckets: int, max_position: int, device=None):
    """DeBERTa's bucket of each (query i, key j) distance i - j, as an index into the 2 * buckets rows of
    the relative embeddings: (L, L) long, idx[i, j] = bucket(i - j) + buckets.

    Distances up to buckets / 2 keep a bucket of their own; farther ones share buckets whose width grows
    logarithmically, so that the last bucket (buckets/2 - 1 steps further) is reached at max_position - 1.
    Worked example with DeBERTa-v3's buckets 256, max_position 512 (mid = 128):
        i - j = 5    -> 5                                        (|d| <= 128: exact)
        i - j = 200  -> ceil(log(200/128) / log(511/128) * 127) + 128 = ceil(40.95) + 128 = 169
        i - j = 511  -> ceil(log(511/128) / log(511/128) * 127) + 128 = 255
        i - j = -200 -> -169                                     (the sign is kept)
    so 384-token windows use buckets -229 .. 229. float32 throughout, exactly as transformers'
    make_log_bucket_position computes it (a ceil on a float64 value could land in the next bucket)."""
    pos = torch.arange(L, device=device)
    rel = pos[:, None] - pos[None, :]  # (L, L): i - j
    mid = buckets // 2
    abs_rel = torch.where(rel.abs() < mid, torch.full_like(rel, mid - 1), rel.abs())
    log_pos = torch.ceil(torch.log(abs_rel / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    bucket = torch.where(abs_rel <= mid, rel.float(), log_pos * torch.sign(rel)).long()
    return torch.clamp(bucket + buckets, 0, 2 * buckets - 1)  # (L, L)


def disentangled_bias(q, k, pos_q, pos_k, idx):
    """DeBERTa's position terms of the attention scores, unscaled: (B, nh, L, L).

    content-to-position  c2p[i, j] = q_i . Kr[idx[i, j]]   (query i's content, key j's position from i)
    position-to-content  p2c[i, j] = k_j . Qr[idx[i, j]]   (key j's content, query i's position from j)
    with Qr, Kr the shared relative embeddings through this layer's own query and key projections.
    q, k: (B, nh, L, hs); pos_q, pos_k: (nh, 2S, hs); idx: (L, L) indices into the 2S rows."""
    B, nh, L, _ = q.shape
    index = idx.expand(B, nh, L, L)
    c2p = torch.gather(q @ pos_k.transpose(-1, -2), -1, index)  # (B, nh, L, 2S) -> (B, nh, L, L)
    # k_j against every Qr row, then for each (j, i) the row idx[i, j]: gather along the transposed index.
    p2c = torch.gather(k @ pos_q.transpose(-1, -2), -1, index.transpose(-1, -2)).transpose(-1, -2)
    return c2p + p2c


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.qkv = None  # one Linear(H, 3H) for q|k|v in place of the three: set only by infer.py's fuse_qkv
        self.attn_dropout = cfg.attention_probs_dropout_prob
        self.rel_dropout = cfg.hidden_dropout_prob  # DeBERTa's dropout on the relative embeddings

    def project(self, x):  # (..., H) -> q, k, v: (..., H) each
        if self.qkv is None:
            return self.query(x), self.key(x), self.value(x)
        # CPU inference (infer.py): one matmul, and in int8 the input quantised once, not three times
        return self.qkv(x).chunk(3, dim=-1)

    def forward(self, x, mask, rel=None, need_scores=False):
        """(output (B, L, H), scores): scores are the logits SDPA softmaxes, (B, nh, L, L), when need_scores
        (TinyBERT's attention loss: tinyqa/intermediate.py), else None. The output always comes from SDPA,
        so asking for the scores changes nothing else; padded keys' scores are left in, the loss skips them.
        With `mask` a list of window lengths, x is those windows laid end to end without padding, (N, H):
        see `unpadded`."""
        if isinstance(mask, list):
            return self.unpadded(x, mask), None
        B, L, H = x.shape
        hs = H // self.n_head
        q, k, v = self.project(x)  # (B, L, H) each
        # (B, L, H) -> (B, L, nh, hs) -> (B, nh, L, hs)
        q, k, v = (t.view(B, L, self.n_head, hs).transpose(1, 2) for t in (q, k, v))
        if rel is None:
            # mask: (B, 1, 1, L) bool, True where a key may be attended to. Padded query rows still see the
            # real keys, so no row is all -inf and SDPA never produces NaN.
            bias, scale, position = mask, 1 / math.sqrt(hs), None  # SDPA's default scale, written out
        else:
            # DeBERTa: scores = (q.k + c2p + p2c) / sqrt(3 hs), three terms, hence the 3. The position
            # terms enter SDPA as an additive float mask (already scaled), padding keys at the dtype's min.
            # (transformers also masks the padded query rows entirely; their outputs are never used.)
            rel_emb, idx = rel  # (2S, H) LayerNorm-ed relative embeddings, (L, L) bucket indices
            rel_emb = F.dropout(rel_emb, self.rel_dropout, self.training)
            pos_q = self.query(rel_emb).view(-1, self.n_head, hs).transpose(0, 1)  # (2S, H) -> (nh, 2S, hs)
            pos_k = self.key(rel_emb).view(-1, self.n_head, hs).transpose(0, 1)
            scale = 1 / math.sqrt(3 * hs)
            position = disentangled_bias(q, k, pos_q, pos_k, idx) * scale  # (B, nh, L, L)
            bias = position.masked_fill(~mask, torch.finfo(position.dtype).min)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, H)  # (B, nh, L, hs) -> (B, L, H)
        scores = None
        if need_scores:  # the same logits SDPA computed inside, (B, nh, L, L): q.k scaled (+ DeBERTa's terms)
            scores = (q @ k.transpose(-1, -2)) * scale
            scores = scores if position is None else scores + position
        return self.out(y), scores

    def unpadded(self, x, lengths):
        """Attention over windows of `lengths` (summing to N) laid end to end without padding, x (N, H): a
        window attends to itself alone, so SDPA needs no mask, and consecutive windows of one length (runs of
        full 384-token windows in a length-sorted batch) share a call. Inference on the CPU only (no dropout,
        no DeBERTa bias): EncoderForQA.forward_unpadded. Returns (N, H)."""
        H = x.shape[1]
        hs = H // self.n_head
        q, k, v = self.project(x)  # (N, H) each
        out, start = [], 0
        for n, run in itertools.groupby(lengths):
            count = len(list(run))
            rows = slice(start, start + count * n)
            # (count * n, H) -> (count, n, nh, hs) -> (count, nh, n, hs)
            qw, kw, vw = (t[rows].view(count, n, self.n_head, hs).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(qw, kw, vw)  # (count, nh, n, hs); default scale 1/sqrt(hs)
            out.append(y.transpose(1, 2).reshape(count * n, H))
            start += count * n
        # SDPA's CPU output is laid out (count, n, nh, hs), so each reshape above is free; one run needs no cat
        return self.out(out[0] if len(out) == 1 else torch.cat(out))  # (N, H)


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = nn.GELU()  # exact erf GELU, not the tanh approximation (a module: infer.py fuses it into `up`)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    """Post-LN block: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x))). The same in all four families.
    x is (B, L, H) with a mask, or (N, H) with the windows' lengths (SelfAttention.unpadded): LayerNorm,
    the feed-forward and the adds act on the last dimension alone, so the block is the same for both."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, mask, rel=None, need_scores=False):
        a, scores = self.attn(x, mask, rel, need_scores)
        x = self.ln_attn(x + self.drop(a))
        return self.ln_ffn(x + self.drop(self.ffn(x))), scores


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.rel_embeddings = self.ln_rel = None
        if cfg.relative_attention:  # DeBERTa: one table of 2 x 256 relative embeddings shared by all layers
            self.buckets, self.max_relative = cfg.position_buckets, cfg.max_relative
            self.rel_embeddings = nn.Embedding(2 * cfg.position_buckets, cfg.hidden_size)
            self.ln_rel = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, attention_mask, token_type_ids=None, output_hidden_states=False,
                output_scores=(), unpadded=False):
        """(last hidden state, all hidden states or None, attention scores or None). output_scores: the
        0-based layers whose scores to return (True: all); the others' entries are None. unpadded: after the
        embeddings, only the real tokens go through the layers, laid end to end: the last hidden state is
        then (N, H), with N the batch's real tokens (EncoderForQA.forward_unpadded)."""
        mask = attention_mask.bool()[:, None, None, :]  # (B, L) -> (B, 1, 1, L), broadcast over heads and queries
        x = self.embeddings(input_ids, attention_mask, token_type_ids)
        if unpadded:
            keep = attention_mask.bool()  # (B, L)
            x, mask = x[keep], keep.sum(dim=1).tolist()  # (B, L, H) -> (N, H); the windows' lengths
        rel = None
        if self.rel_embeddings is not None:  # normalised once, projected by each layer with its own q/k
            idx = relative_position_buckets(input_ids.shape[1], self.buckets, self.max_relative, input_ids.device)
            rel = (self.ln_rel(self.rel_embeddings.weight), idx)
        wanted = set(range(len(self.layers))) if output_scores is True else set(output_scores or ())
        hidden, scores = [x], []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, mask, rel, need_scores=i in wanted)
            hidden.append(x)
            scores.append(s)
        return x, (tuple(hidden) if output_hidden_states else None), (tuple(scores) if wanted else None)


class EncoderForQA(nn.Module):
    """Encoder + `qa_outputs` (Linear(H, 2)) giving start and end logits per token."""

    def __init__(self, cfg: EncoderConfig):
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

    def forward(self, input_ids, attention_mask, token_type_ids=None, output_hidden_states=False,
                output_scores=()) -> QAOutput:
        """input_ids, attention_mask, token_type_ids: (B, L); token types default to all 0.
        output_hidden_states and output_scores (layers, or True for all) serve intermediate-layer distillation."""
        x, hidden, scores = self.encoder(input_ids, attention_mask, token_type_ids, output_hidden_states,
                                         output_scores)  # (B, L, H)
        logits = self.qa_outputs(x).float()  # (B, L, 2), float32 whatever the compute dtype
        start, end = logits.unbind(dim=-1)  # (B, L) each
        return QAOutput(start.contiguous(), end.contiguous(), hidden, scores)

    @torch.inference_mode()
    def forward_unpadded(self, input_ids, attention_mask, token_type_ids=None):
        """Start and end logits computed on the real tokens only: two lists with one (n_i,) tensor per window.
        Every Linear, LayerNorm and residual add sees (N, H), the batch's N real tokens, rather than
        (B, L, H) with padding; attention runs per window (SelfAttention.unpadded). Inference only (no
        dropout) and not for DeBERTa, whose position bias is built for the padded length; equal to forward's
        logits on each window's real tokens (tests/test_cpu_paths.py)."""
        if self.training or self.config.relative_attention:
            raise ValueError("forward_unpadded is for inference (eval mode) of RoBERTa, BERT and ELECTRA models")
        x, _, _ = self.encoder(input_ids, attention_mask, token_type_ids, unpadded=True)  # (N, H)
        lengths = attention_mask.sum(dim=1).tolist()
        start, end = self.qa_outputs(x).float().unbind(dim=-1)  # (N,) each
        return start.contiguous().split(lengths), end.contiguous().split(lengths)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_token(cfg: EncoderConfig, seq_len: int, batch_size: int = 1) -> float:
    """Forward FLOPs (2 per multiply-add, matmuls only) per token of a batch of windows of seq_len tokens:
    what the benchmarks divide by time to compare against the machine's matmul peak. batch_size matters only
    for DeBERTa, whose 2S relative embeddings go through each layer's query and key projections once per
    forward pass, shared by the batch."""
    H, I, N, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.embedding_size
    per_layer = 2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq_len * H  # Q, K, V, out, up, down + QK^T and AV
    if cfg.relative_attention:
        S2 = 2 * cfg.position_buckets
        per_layer += 2 * 2 * S2 * H  # c2p and p2c: each token's q (k) against the 2S projected embeddings
        per_layer += 2 * 2 * S2 * H * H / (seq_len * batch_size)  # Qr, Kr: 2S rows through query and key
    project = 2 * E * H if E != H else 0  # ELECTRA's embeddings_project
    return N * per_layer + project + 2 * 2 * H  # + qa_outputs
