"""The family's tokenizers, through the `tokenizers` library: byte-level BPE (RoBERTa), WordPiece (BERT,
ELECTRA, MiniLMv2-from-BERT) and SentencePiece Unigram (DeBERTa-v3).

`load_tokenizer` reads tokenizer.json when there is one (any of the three); else it builds the same
pipeline from the classic vocabulary files the way transformers' converters do
(`convert_slow_tokenizer.py`):
- vocab.json + merges.txt -> RoBERTa (RobertaConverter): byte-level pre-tokenizer without a prefix space,
  the `<s> A </s></s> B </s>` pair template, offsets trimmed of the leading space BPE glues to each word;
- vocab.txt -> BERT (BertConverter): BertNormalizer (lower-casing and accent stripping unless
  tokenizer_config.json says the vocabulary is cased), BertPreTokenizer, WordPiece with '##'
  continuations, `[CLS] A [SEP] B [SEP]` with token types 0 / 1.
DeBERTa-v3 needs its tokenizer.json (its spm.model is a protobuf that `tokenizers` does not read).
Truncation and padding are switched off, whatever the file says (all-MiniLM-L6-v2's pads to 128):
windows and padding are made in `features.py` and the collator.
"""
import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .errors import TinyQAError
from .catalog import resolve_dir


def build_from_vocab_merges(vocab_path: str, merges_path: str) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(vocab_path, merges_path, continuing_subword_prefix="",
                                         end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),  # (sep, cls)
                                                      ("<s>", tok.token_to_id("<s>")),
                                                      trim_offsets=True, add_prefix_space=False)
    # The special tokens are in vocab.json already; registering them keeps them whole in raw text.
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", AddedToken("<mask>", lstrip=True)])
    return tok


def build_from_vocab_txt(vocab_path: str, lowercase=True, strip_accents=None, tokenize_chinese_chars=True) -> Tokenizer:
    """BERT's WordPiece from vocab.txt (one token per line, the line number is its id), as BertConverter
    builds it. strip_accents None follows lowercase, as in the original BERT."""
    with open(vocab_path, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]"):
        if t not in vocab:
            raise TinyQAError(f"{vocab_path}: no {t} token: not a BERT vocabulary")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
    return tok


def load_tokenizer(name_or_path: str) -> Tokenizer:
    directory = resolve_dir(name_or_path, model=False, tokenizer=True)
    tj = os.path.join(directory, "tokenizer.json")
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    vocab_txt = os.path.join(directory, "vocab.txt")
    try:
        if os.path.exists(tj):
            tok = Tokenizer.from_file(tj)
        elif os.path.exists(vocab) and os.path.exists(merges):
            tok = build_from_vocab_merges(vocab, merges)
        elif os.path.exists(vocab_txt):
            settings = _read_json(os.path.join(directory, "tokenizer_config.json"))
            tok = build_from_vocab_txt(vocab_txt, lowercase=settings.get("do_lower_case", True),
                                       strip_accents=settings.get("strip_accents"),
                                       tokenize_chinese_chars=settings.get("tokenize_chinese_chars", True))
        elif os.path.exists(os.path.join(directory, "spm.model")):
            raise TinyQAError(f"{directory}: only spm.model, which tinyqa cannot read: write its tokenizer.json "
                              "once with transformers (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
        else:
            raise TinyQAError(f"{directory}: no tokenizer.json, vocab.txt, nor vocab.json + merges.txt")
    except Exception as e:
        if isinstance(e, TinyQAError):
            raise
        raise TinyQAError(f"{directory}: cannot read the tokenizer ({e})")
    tok.no_truncation()
    tok.no_padding()
    return tok


def _read_json(path) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A short hash of the vocabulary (token -> id): teacher and student must agree on it, and caches
    key on it. The vocabulary, not the JSON, so tokenizer.json and vocab.json + merges.txt agree."""
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items())
    return hashlib.sha1(json.dumps(vocab).encode()).hexdigest()[:16]


def tokenizer_config(tok: Tokenizer, model_max_length=None) -> dict:
    """What transformers' AutoTokenizer needs beside tokenizer.json to treat it as the family's tokenizer."""
    kind = type(tok.model).__name__  # BPE, WordPiece or Unigram
    if kind == "BPE":
        cfg = {"tokenizer_class": "RobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
               "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
               "add_prefix_space": False}
    elif kind == "WordPiece":
        norm = json.loads(tok.to_str()).get("normalizer") or {}
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": bool(norm.get("lowercase", False)),
               "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
               "mask_token": "[MASK]"}
    elif kind == "Unigram":
        cfg = {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False, "bos_token": "[CLS]",
               "eos_token": "[SEP]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
               "pad_token": "[PAD]", "mask_token": "[MASK]"}
    else:
        raise TinyQAError(f"tokenizer model {kind!r} is not one of the family's (BPE, WordPiece, Unigram)")
    # Only the special tokens this vocabulary really has.
    cfg = {k: v for k, v in cfg.items() if not k.endswith("_token") or tok.token_to_id(v) is not None}
    if model_max_length is not None:  # the model's real window, not a family's usual 512
        cfg["model_max_length"] = int(model_max_length)
    return cfg


def save_tokenizer(tok: Tokenizer, directory: str, model_max_length=None):
    """tokenizer.json + a tokenizer_config.json right for the family. Pass the model's longest window
    (EncoderConfig.max_window_len) as model_max_length; without it none is claimed."""
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(tok, model_max_length), f, indent=2)


@dataclass(frozen=True)
class ByteLevelVocab:
    """Per token id, what byte-level BPE's offsets are made of. Its tokens cover the text's UTF-8 bytes end to
    end, so a context's offsets follow from its ids alone: token t spans n_bytes[t] bytes, less the leading
    and trailing spaces (Ġ) the tokenizer trims off them (trim_offsets); features.py turns those into char
    offsets. That lets training encode contexts with encode_batch_fast, which skips the offsets."""
    n_bytes: np.ndarray  # (V,) int64: bytes of text the token stands for
    lead: np.ndarray  # (V,) int64: its leading spaces, left out of its offsets
    trail: np.ndarray  # (V,) int64: its trailing spaces
    specials: tuple  # the added tokens' texts: a context holding one is encoded with offsets instead


_BYTE_LEVEL = weakref.WeakKeyDictionary()  # tokenizer -> (its settings, ByteLevelVocab or None)


def byte_level_vocab(tok: Tokenizer) -> Optional[ByteLevelVocab]:
    """The tables for RoBERTa's tokenizer: byte-level BPE with no normalizer, a ByteLevel pre-tokenizer
    without a prefix space, and offsets trimmed of spaces by its post-processor (as RobertaConverter and
    build_from_vocab_merges make it). None for any other tokenizer. Built once per tokenizer (0.1 s)."""
    parts = (tok.normalizer, tok.pre_tokenizer, tok.post_processor)
    state = (tok.get_vocab_size(with_added_tokens=True), type(tok.model).__name__,
             *(p.__getstate__() if p is not None else None for p in parts))  # what a later change would change
    cached = _BYTE_LEVEL.get(tok)
    if cached is not None and cached[0] == state:
        return cached[1]
    d = json.loads(tok.to_str())
    model, pre, post = d.get("model") or {}, d.get("pre_tokenizer") or {}, d.get("post_processor") or {}
    applies = (model.get("type") == "BPE" and d.get("normalizer") is None and pre.get("type") == "ByteLevel"
               and not pre.get("add_prefix_space") and post.get("type") in ("RobertaProcessing", "ByteLevel")
               and post.get("trim_offsets") and not post.get("add_prefix_space"))
    vocab = None
    if applies:
        n_bytes, lead, trail = (np.zeros(state[0], np.int64) for _ in range(3))
        for token, i in model["vocab"].items():  # byte-level: one character per byte, "Ġ" for a space
            n_bytes[i] = len(token)
            lead[i], trail[i] = len(token) - len(token.lstrip("Ġ")), len(token) - len(token.rstrip("Ġ"))
        specials = tuple(t["content"] for t in d.get("added_tokens") or ())
        vocab = ByteLevelVocab(n_bytes, lead, trail, specials)
    _BYTE_LEVEL[tok] = (state, vocab)
    return vocab
