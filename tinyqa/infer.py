"""Batched inference: examples -> windows -> logits -> answers, and the small answer API on top.

    qa = QuestionAnswerer.from_pretrained("tinyroberta-mrqa")
    qa.answer("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare.")
    # Answer(text='William Shakespeare', score=..., start=31, end=50)

Features are sorted by length before batching, so each batch is padded only to its own longest window;
logits are trimmed back to each feature's length before decoding.
"""
import os
from dataclasses import dataclass, replace

import torch

from .checks import check_device, check_vocab, check_window
from .decode import decode
from .files import read_json
from .features import FeaturizerConfig, collate, featurize, length_sorted_batches
from .mrqa import Example


@dataclass
class DecodeConfig:
    n_best: int = 20
    max_answer_len: int = 30  # tokens
    allow_null: bool = False  # SQuAD 2.0-style models only: MRQA questions always have an answer


def quantize_int8(model):
    """Dynamic int8 quantisation of every Linear (CPU only): weights stored int8, activations quantised
    per batch. Trades a little accuracy for speed; see benchmarks/bench_inference.py."""
    from torch.ao.quantization import quantize_dynamic
    p = next(model.parameters())
    check_device(p.device, p.dtype, "int8")
    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


# On CPU, batches hold at most this many padded tokens (4 windows of 384). Not for memory: the largest
# activation, the feed-forward's (tokens, intermediate_size) float32, then stays under 32 MB (19 MB for
# tinyroberta, 25 MB for roberta-large). glibc's malloc hands freed blocks up to 32 MB back out again, but
# serves bigger ones with a fresh mmap whose every page the kernel must zero on first touch. Measured end
# to end on 2 cores (benchmarks/bench_inference.py): 77% of the matmul peak with 4,096-token batches, 90%
# with 1,536; the matmuls, 1,536 x 768 or bigger, lose nothing by being smaller. It also lowers peak RSS.
# GPUs have a caching allocator and want big batches, so there only batch_size limits a batch.
CPU_MAX_TOKENS = 1536


def max_tokens_for(device):
    return CPU_MAX_TOKENS if torch.device(device).type == "cpu" else None


@torch.inference_mode()
def run_model(model, features, batch_size=64, device="cpu", progress=False):
    """Start and end logits (float32 numpy, unpadded) of every feature, in the features' order."""
    from tqdm import tqdm
    starts, ends = [None] * len(features), [None] * len(features)
    batches = length_sorted_batches(features, batch_size, max_tokens_for(device))
    for idx in tqdm(batches, desc="inference", unit="batch", disable=not progress):
        batch = collate([features[i] for i in idx])
        out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        s, e = out.start_logits.cpu().numpy(), out.end_logits.cpu().numpy()
        for row, i in enumerate(idx):
            n = len(features[i].input_ids)
            starts[i], ends[i] = s[row, :n], e[row, :n]
    return starts, ends


def featurizer_config_of(name_or_path, **overrides) -> FeaturizerConfig:
    """The window settings a checkpoint was trained with (its args.json, written by tinyqa's training),
    else the card's; explicit overrides (not None) win. A 128-position demo model then just works."""
    cfg = FeaturizerConfig()
    path = os.path.join(name_or_path, "args.json")
    if os.path.isdir(name_or_path) and os.path.exists(path):
        saved = read_json(path, "the checkpoint's training arguments")
        cfg = FeaturizerConfig(**{k: saved[k] for k in ("max_seq_len", "doc_stride", "max_query_length")
                                  if isinstance(saved.get(k), int)})
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def predict(model, tokenizer, examples, fcfg=FeaturizerConfig(), dcfg=DecodeConfig(), batch_size=64,
            device="cpu", progress=False) -> dict:
    """{qid: Prediction} for a list of Examples."""
    cfg = getattr(model, "config", None)
    if cfg is not None:  # a quantised model keeps its config too
        check_window(cfg, fcfg.max_seq_len)
        check_vocab(tokenizer, cfg)
    features = featurize(examples, tokenizer, fcfg, with_labels=False)
    starts, ends = run_model(model, features, batch_size, device, progress)
    return decode(examples, features, starts, ends, dcfg.n_best, dcfg.max_answer_len, dcfg.allow_null)


@dataclass
class Answer:
    text: str
    score: float
    start: int  # char offsets into the context, end exclusive
    end: int


class QuestionAnswerer:
    def __init__(self, model, tokenizer, fcfg=FeaturizerConfig(), dcfg=DecodeConfig(), batch_size=64, device="cpu"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.fcfg, self.dcfg, self.batch_size, self.device = fcfg, dcfg, batch_size, device

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32, quantize=None, fcfg=None, **kw):
        from .tokenizer import load_tokenizer
        from .weights import load_model
        model = load_model(name_or_path, device=device, dtype=dtype)
        if quantize == "int8":
            model = quantize_int8(model)
        fcfg = fcfg or featurizer_config_of(name_or_path)
        return cls(model, load_tokenizer(name_or_path), fcfg=fcfg, device=device, **kw)

    def answer(self, question: str, context: str) -> Answer:
        return self.answer_batch([question], [context])[0]

    def answer_batch(self, questions, contexts) -> list:
        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        examples = [Example(str(i), q, c, []) for i, (q, c) in enumerate(zip(questions, contexts))]
        preds = predict(self.model, self.tokenizer, examples, self.fcfg, self.dcfg, self.batch_size, self.device)
        return [Answer(p.text, p.score, p.start, p.end) for p in (preds[ex.qid] for ex in examples)]
