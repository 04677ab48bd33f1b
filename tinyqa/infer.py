"""Batched inference: examples -> windows -> logits -> answers, and the answer API on top.

    qa = QuestionAnswerer.from_pretrained("tinyroberta-mrqa")
    qa.answer("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare.")
    # Answer(text='William Shakespeare', score=0.93, start=31, end=50, logit_score=17.2)
    qa.answer_batch([("Who?", c1), {"question": "When?", "context": c2}], top_k=3)

`predict` (evaluate.py, training's eval) decodes with run_qa's n-best over logit sums; `QuestionAnswerer`
decodes as transformers' question-answering pipeline did, with its probabilities (tinyqa/decode.py).

Features are sorted by length before batching, so each batch is padded only to its own longest window;
on the CPU the layers then skip even that padding (forward_unpadded); logits are trimmed back to each
feature's length before decoding.
"""
import copy
import itertools
import os
from dataclasses import replace

import torch
import torch.nn.functional as F

from .checks import check_device
from .decode import Answer, DecodeConfig, answer_example, decode  # noqa: F401  (Answer: tinyqa.infer.Answer)
from .errors import TinyQAError
from .features import FeaturizerConfig, check_model_fits, collate, featurize, length_sorted_batches
from .files import read_json
from .mrqa import Example


@torch.no_grad()
def fuse_qkv(model):
    """Each layer's query, key and value Linears merged, in place, into one Linear(H, 3H) (SelfAttention.qkv):
    one matmul reads the input once instead of three times, and in int8 quantises it once. Not for DeBERTa,
    whose relative position embeddings go through query and key alone. Returns the model (inference only:
    its state_dict no longer has the checkpoint's keys)."""
    from .model import SelfAttention
    if model.config.relative_attention:
        return model
    for m in model.modules():
        if isinstance(m, SelfAttention) and m.qkv is None:
            parts = (m.query, m.key, m.value)
            w = torch.cat([p.weight for p in parts])  # (3H, H): q rows, then k, then v
            m.qkv = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
            m.qkv.weight.copy_(w)
            m.qkv.bias.copy_(torch.cat([p.bias for p in parts]))
            m.query = m.key = m.value = None
    return model


def quantize_int8(model):
    """Dynamic int8 quantisation of every Linear (CPU only): weights stored int8 with one scale per output row,
    activations quantised per batch. Trades a little accuracy for speed; see benchmarks/bench_onnx.py.
    Returns a quantised copy whose q, k and v projections are one Linear (fuse_qkv): each layer's input is
    then quantised once, not three times (measured 1.03-1.14x on tinyroberta's forward). Per-row scales keep
    q, k and v each on its own scale inside it (and cost nothing measurable in speed).
    The kernels: PyTorch's default int8 engine (x86, fbgemm's) on most CPUs, but oneDNN's where the CPU has
    AVX-512 VNNI or AMX: measured on a 2-core Sapphire Rapids, a tinyroberta feed-forward (1,536 tokens)
    took 11 ms with oneDNN (AMX) and 31 ms with the default, and 21 vs 28 ms with oneDNN held to AVX-512
    VNNI; on AVX2 alone oneDNN was 2x slower. The weights are packed for the engine chosen here, and
    their forward runs its kernels whatever the global engine is later."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    p = next(model.parameters())
    check_device(p.device, p.dtype, "int8")
    previous = torch.backends.quantized.engine
    if "onednn" in torch.backends.quantized.supported_engines and getattr(torch.cpu, "_is_vnni_supported",
                                                                          lambda: False)():
        torch.backends.quantized.engine = "onednn"
    try:
        return quantize_dynamic(fuse_qkv(copy.deepcopy(model)), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8, inplace=True)
    finally:
        torch.backends.quantized.engine = previous


class PackedLinear(torch.nn.Module):
    """An nn.Linear for fp32 CPU inference through oneDNN: the weight reordered once into oneDNN's blocked
    layout, the bias (and, for the feed-forward's first Linear, the GELU) applied inside the matmul. nn.Linear
    runs MKL's addmm, which first copies the bias into every output row, and GELU is then one more pass over
    the (tokens, 3072) activation. The weight is no longer an nn.Parameter: a packed model is for inference
    only (train and save the model you loaded; pack a copy)."""

    def __init__(self, linear: torch.nn.Linear, gelu=False):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)  # oneDNN layout
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self.post_op, self.algorithm = ("gelu", "none") if gelu else ("none", "")  # "none": erf GELU, not tanh

    def forward(self, x):  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.post_op, [], self.algorithm)


def packing_pays() -> bool:
    """Where PackedLinear was measured faster than nn.Linear: CPUs with AVX-512 (2-core Sapphire Rapids,
    tinyroberta forward on 4 x 384 windows: 694 vs 753 ms, pairwise median 1.08x; logits within 2.3e-6).
    On an AVX2-only AMD EPYC, oneDNN's Linear was slower than MKL's (122-133 vs 133-138 GFLOP/s)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


@torch.no_grad()
def pack_for_cpu(model, force=False):
    """The model's Linears replaced by PackedLinear, in place, when it is fp32 on the CPU and packing pays
    here (or `force`); the feed-forward's GELU moves into its first Linear. Returns the model."""
    p = next(model.parameters())
    has_linears = any(type(m) is torch.nn.Linear for m in model.modules())  # not int8 ones (quantize_int8)
    if not has_linears or p.device.type != "cpu" or p.dtype != torch.float32 or not (force or packing_pays()):
        return model
    from .model import FeedForward
    for module in list(model.modules()):
        if isinstance(module, FeedForward) and type(module.up) is torch.nn.Linear:
            module.up, module.act = PackedLinear(module.up, gelu=True), torch.nn.Identity()
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, PackedLinear(child))
    return model


def unpadding_pays(model, device) -> bool:
    """Where run_model computes on the real tokens only (forward_unpadded): CPU inference. Measured on a 2-core
    Sapphire Rapids, tinyroberta fp32 on SQuAD dev's windows in run_model's batches: 1.13-1.15x when the
    questions come 25 at a time (7.4% of the padded tokens are padding), 1.01-1.02x when 300 are sorted
    together (0.7%). Not on GPUs, where one SDPA call per window length would cost a kernel launch each, nor
    for DeBERTa, whose relative position bias is built for the padded length."""
    return torch.device(device).type == "cpu" and not model.training and not model.config.relative_attention


def attention_unpadded(attn, x, lengths):
    """attn (a SelfAttention) over windows laid end to end without padding: x (N, H) holds the tokens of
    windows of `lengths` (summing to N) one after another. A window attends to itself alone, so SDPA needs no
    mask; consecutive windows of one length (runs of full 384-token windows in a length-sorted batch) share a
    call. Returns (N, H)."""
    H = x.shape[1]
    nh = attn.n_head
    hs = H // nh
    q, k, v = attn.project(x)  # (N, H) each
    out, start = [], 0
    for n, run in itertools.groupby(lengths):
        count = len(list(run))
        rows = slice(start, start + count * n)
        # (count * n, H) -> (count, n, nh, hs) -> (count, nh, n, hs)
        qw, kw, vw = (t[rows].view(count, n, nh, hs).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(qw, kw, vw)  # (count, nh, n, hs); default scale 1/sqrt(hs)
        out.append(y.transpose(1, 2).reshape(count * n, H))
        start += count * n
    # SDPA's CPU output is laid out (count, n, nh, hs), so each reshape above is free; one run needs no cat
    return attn.out(out[0] if len(out) == 1 else torch.cat(out))  # (N, H)


@torch.inference_mode()
def forward_unpadded(model, input_ids, attention_mask, token_type_ids=None):
    """An EncoderForQA's start and end logits computed on the real tokens only: two lists with one (n_i,)
    tensor per window. Every Linear, LayerNorm and residual add sees (N, H), the batch's N real tokens, rather
    than (B, L, H) with padding; attention runs per window (attention_unpadded). This is Layer.forward, post-LN,
    in inference (no dropout); tests/test_cpu_paths.py holds it equal to the padded forward in each family."""
    keep = attention_mask.bool()  # (B, L)
    lengths = keep.sum(dim=1).tolist()
    x = model.encoder.embeddings(input_ids, attention_mask, token_type_ids)[keep]  # (B, L, H) -> (N, H)
    for layer in model.encoder.layers:
        x = layer.ln_attn(x + attention_unpadded(layer.attn, x, lengths))
        x = layer.ln_ffn(x + layer.ffn(x))
    start, end = model.qa_outputs(x).float().unbind(dim=-1)  # (N,) each
    return start.contiguous().split(lengths), end.contiguous().split(lengths)


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
    batches = length_sorted_batches([len(f.input_ids) for f in features], batch_size, max_tokens_for(device))
    unpad = unpadding_pays(model, device)
    for idx in tqdm(batches, desc="inference", unit="batch", disable=not progress):
        batch = collate([features[i] for i in idx], pad_id=model.config.pad_token_id)
        inputs = (batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["token_type_ids"].to(device))
        if unpad:  # the real tokens only: one (n,) tensor per window
            s, e = forward_unpadded(model, *inputs)
            for row, i in enumerate(idx):
                starts[i], ends[i] = s[row].numpy(), e[row].numpy()
            continue
        out = model(*inputs)
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
    features, starts, ends = forward_examples(model, tokenizer, examples, fcfg, batch_size, device, progress)
    return decode(examples, features, starts, ends, dcfg.n_best, dcfg.max_answer_len, dcfg.allow_null)


def forward_examples(model, tokenizer, examples, fcfg=FeaturizerConfig(), batch_size=64, device="cpu",
                     progress=False):
    """The windows of the examples and their start and end logits: (features, starts, ends)."""
    check_model_fits(model.config, tokenizer, fcfg.max_seq_len)  # window length, vocabulary, pad id, types
    # (a quantised model keeps its config too)
    features = featurize(examples, tokenizer, fcfg, with_labels=False)
    starts, ends = run_model(model, features, batch_size, device, progress)
    return features, starts, ends


class QuestionAnswerer:
    """Extractive QA over any context length: what transformers' question-answering pipeline gave.

    Every answering method takes these options per call (defaults: the answerer's fcfg and dcfg, which
    from_pretrained takes from the checkpoint's args.json, else the model card's):
      top_k (1)                   answers per question, best first, no two with the same text
      max_answer_len (30)         longest answer in tokens (the 4.x pipeline's default was 15)
      max_seq_len (384)           tokens per window, special tokens included
      doc_stride (128)            overlap in tokens between consecutive windows of a long context
      max_question_len (64)       question tokens kept (run_qa's max_query_length)
      handle_impossible_answer    rank the null answer ("", 0, 0) among the others (SQuAD 2.0-style models)
      align_to_words (True)       widen answers to whole words
    An Answer's score is the pipeline's probability; logit_score is start_logit + end_logit.
    """

    # A chunk of questions is featurized, run and decoded together: at most this many questions, and
    # at most this many context characters summed over its questions (a long context repeated for many
    # questions makes that many windows), so memory stays bounded whatever the input's length.
    chunk_questions = 64
    chunk_chars = 2_000_000

    def __init__(self, model, tokenizer, fcfg=FeaturizerConfig(), dcfg=DecodeConfig(), batch_size=64, device="cpu"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.fcfg, self.dcfg, self.batch_size, self.device = fcfg, dcfg, batch_size, device

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32, quantize=None, fcfg=None,
                        prepack=True, **kw):
        """Load a checkpoint (alias, hub id or local directory) and its tokenizer. quantize="int8": dynamic
        int8 Linear layers (CPU). fcfg: window settings (default: the checkpoint's args.json, else the card's).
        prepack: fp32 on an AVX-512 CPU, run the Linears through oneDNN with packed weights (pack_for_cpu:
        ~8% faster, logits within a few 1e-6; the model is then for inference only). Other keywords (dcfg,
        batch_size) go to the constructor."""
        from .tokenizer import load_tokenizer
        from .weights import load_model
        model = load_model(name_or_path, device=device, dtype=dtype)
        if quantize == "int8":
            model = quantize_int8(model)
        elif prepack:
            model = pack_for_cpu(model)  # where it pays: fp32 on an AVX-512 CPU
        fcfg = fcfg or featurizer_config_of(name_or_path)
        return cls(model, load_tokenizer(name_or_path), fcfg=fcfg, device=device, **kw)

    def answer(self, question: str, context: str, top_k=None, max_answer_len=None, doc_stride=None,
               max_seq_len=None, max_question_len=None, handle_impossible_answer=None, align_to_words=None):
        """The best Answer to `question` in `context`, or a list of the top_k best when top_k > 1.
        Options as in the class docstring; None keeps the answerer's default."""
        return self.answer_batch([(question, context)], top_k=top_k, max_answer_len=max_answer_len,
                                 doc_stride=doc_stride, max_seq_len=max_seq_len, max_question_len=max_question_len,
                                 handle_impossible_answer=handle_impossible_answer, align_to_words=align_to_words)[0]

    def answer_batch(self, inputs, contexts=None, **options) -> list:
        """Answers for many questions at once, in input order: one Answer per question (a list of up to
        top_k when top_k > 1). `inputs` is a list of (question, context) pairs or {"question", "context"}
        dicts; or, with `contexts`, a list of questions and either one context for all of them (tokenized
        once) or a list of as many contexts. Options as in the class docstring."""
        return list(self.answer_stream(pairs_of(inputs, contexts), **options))

    def answer_stream(self, inputs, **options):
        """Like answer_batch, but lazily: `inputs` may be any iterable (a generator, a file's lines parsed
        on the fly) and is read a chunk of questions at a time, answers yielded as each chunk completes,
        so memory does not grow with the number of questions."""
        fcfg, dcfg = self._configs(**options)  # bad options fail here, not at the first answer
        check_model_fits(self.model.config, self.tokenizer, fcfg.max_seq_len)
        return self._stream(pairs_of(inputs, None), fcfg, dcfg)

    def _stream(self, pairs, fcfg, dcfg):
        while chunk := _take_chunk(pairs, self.chunk_questions, self.chunk_chars):
            yield from self._answer_chunk(chunk, fcfg, dcfg)

    def _answer_chunk(self, chunk, fcfg, dcfg):
        examples = [Example(str(i), q, c, []) for i, (q, c) in enumerate(chunk)]
        features = featurize(examples, self.tokenizer, fcfg, with_labels=False)
        starts, ends = run_model(self.model, features, self.batch_size, self.device)
        windows = [[] for _ in examples]
        for f, s, e in zip(features, starts, ends):
            windows[f.example_index].append((s, e, f.offsets, f.words))
        for ex, w in zip(examples, windows):
            answers = answer_example(ex.context, w, dcfg.top_k, dcfg.max_answer_len, dcfg.allow_null,
                                     dcfg.align_to_words)
            yield answers[0] if dcfg.top_k == 1 else answers

    def _configs(self, top_k=None, max_answer_len=None, doc_stride=None, max_seq_len=None, max_question_len=None,
                 handle_impossible_answer=None, align_to_words=None):
        """(FeaturizerConfig, DecodeConfig) of one call: the answerer's, with the given options replaced."""
        for name, v in (("top_k", top_k), ("max_answer_len", max_answer_len), ("max_seq_len", max_seq_len),
                        ("max_question_len", max_question_len)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise TinyQAError(f"{name} must be a whole number >= 1, not {v!r}")
        if doc_stride is not None and (isinstance(doc_stride, bool) or not isinstance(doc_stride, int) or doc_stride < 0):
            raise TinyQAError(f"doc_stride must be a whole number >= 0, not {doc_stride!r}")
        for name, v in (("handle_impossible_answer", handle_impossible_answer), ("align_to_words", align_to_words)):
            if v is not None and not isinstance(v, bool):
                raise TinyQAError(f"{name} must be true or false, not {v!r}")
        fcfg = replace(self.fcfg, **_given(max_seq_len=max_seq_len, doc_stride=doc_stride,
                                           max_query_length=max_question_len))
        dcfg = replace(self.dcfg, **_given(top_k=top_k, max_answer_len=max_answer_len,
                                           allow_null=handle_impossible_answer, align_to_words=align_to_words))
        return fcfg, dcfg


def _given(**kw):
    return {k: v for k, v in kw.items() if v is not None}


def pairs_of(inputs, contexts=None):
    """(question, context) pairs from the accepted input shapes, checked one by one as they are read."""
    if isinstance(inputs, (str, dict)) or (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], str)):
        raise TinyQAError("answer_batch takes a list of (question, context) pairs or dicts; "
                          "for one question use answer(question, context)")
    if contexts is not None:
        questions = list(inputs)
        if isinstance(contexts, str):
            contexts = [contexts] * len(questions)  # the same str object: featurize tokenizes it once
        contexts = list(contexts)
        if len(questions) != len(contexts):
            raise TinyQAError(f"{len(questions)} questions but {len(contexts)} contexts: give as many, or one context")
        inputs = zip(questions, contexts)
    return (_checked(i, x) for i, x in enumerate(inputs))


def _checked(i, item):
    if isinstance(item, dict):
        missing = [k for k in ("question", "context") if k not in item]
        if missing:
            raise TinyQAError(f"input {i}: missing field '{missing[0]}' (give question and context)")
        q, c = item["question"], item["context"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        q, c = item
    else:
        raise TinyQAError(f"input {i}: expected a (question, context) pair or a dict, not {type(item).__name__}")
    for name, v in (("question", q), ("context", c)):
        if not isinstance(v, str):
            raise TinyQAError(f"input {i}: {name} must be a string, not {type(v).__name__}")
        if not v.strip():
            raise TinyQAError(f"input {i}: the {name} is empty" + (" (only whitespace)" if v else ""))
    return q, c


def _take_chunk(pairs, max_questions, max_chars):
    """The next pairs from the iterator, up to max_questions of them or max_chars of context in all (at
    least one). Equal contexts share one str object, so that featurize tokenizes each once."""
    chunk, chars, same = [], 0, {}
    for q, c in pairs:
        c = same.setdefault(c, c)
        chunk.append((q, c))
        chars += len(c)
        if len(chunk) == max_questions or chars >= max_chars:
            break
    return chunk


