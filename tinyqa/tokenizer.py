"""RoBERTa's byte-level BPE tokenizer, through the `tokenizers` library.

`load_tokenizer` reads tokenizer.json when there is one, else builds the same pipeline from
vocab.json + merges.txt the way transformers' RobertaTokenizerFast does (convert_slow_tokenizer's
RobertaConverter): byte-level pre-tokenizer without a prefix space, the `<s> A </s></s> B </s>` pair
template, and offsets trimmed of the leading space that byte-level BPE glues to each word.
Truncation and padding are switched off: windows and padding are made in `features.py` and the collator.
"""
import hashlib
import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import TinyQAError
from .weights import resolve_dir


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


def load_tokenizer(name_or_path: str) -> Tokenizer:
    directory = resolve_dir(name_or_path, model=False, tokenizer=True)
    tj = os.path.join(directory, "tokenizer.json")
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    try:
        if os.path.exists(tj):
            tok = Tokenizer.from_file(tj)
        elif os.path.exists(vocab) and os.path.exists(merges):
            tok = build_from_vocab_merges(vocab, merges)
        else:
            raise TinyQAError(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt")
    except Exception as e:
        if isinstance(e, TinyQAError):
            raise
        raise TinyQAError(f"{directory}: cannot read the tokenizer ({e})")
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A short hash of the vocabulary (token -> id): teacher and student must agree on it, and caches
    key on it. The vocabulary, not the JSON, so tokenizer.json and vocab.json + merges.txt agree."""
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items())
    return hashlib.sha1(json.dumps(vocab).encode()).hexdigest()[:16]


def save_tokenizer(tok: Tokenizer, directory: str):
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    # Enough for transformers' AutoTokenizer to pick the file up as a RoBERTa tokenizer.
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "RobertaTokenizer", "model_max_length": 512, "bos_token": "<s>",
                   "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
                   "pad_token": "<pad>", "mask_token": "<mask>", "add_prefix_space": False}, f, indent=2)
