"""Where checkpoints come from and how their keys become ours: aliases, hub download, safetensors I/O.

- `resolve_dir(name_or_path)`: a local directory as is; an alias or hub id downloaded through
  `huggingface_hub` (only the files needed; the HF cache and HF_HUB_OFFLINE are honoured).
- `ALIASES`: the 17 checkpoints of the card's model-family table (and deepset's TinyRoBERTa line).
- `KEY_MAPS`: one table per family between HF names (`roberta.encoder.layer.3.attention.self.query.weight`,
  `deberta.encoder.layer.3.attention.self.query_proj.weight`) and ours (`encoder.layers.3.attn.query.weight`).
  Every checkpoint key is mapped or explicitly dropped (`DROPPED`, per family); anything else, and every
  shape mismatch, is an error listing the keys. Bare encoder checkpoints (no `bert.` prefix) load too.
- `load_model` / `save_pretrained`: HF-layout directories (config.json + model.safetensors) in and out,
  loadable by `transformers.AutoModelForQuestionAnswering`.
Follows nanoGPT's `from_pretrained` (assert the key sets and every shape) and litgpt's visible key map.
"""
import functools
import json
import os
import re
import socket
import sys
import urllib.parse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checks import check_device
from .errors import TinyQAError
from .model import EncoderConfig, EncoderForQA

# Short names for the published checkpoints this project is about: the 17 rows of the TinyRoBERTa-MRQA
# card's model-family table (VMware's hub ids without "VMware/"), then deepset's TinyRoBERTa line.
ALIASES = {
    "bert-tiny-mrqa": "VMware/bert-tiny-mrqa",
    "bert-base-mrqa": "VMware/bert-base-mrqa",
    "bert-large-mrqa": "VMware/bert-large-mrqa",
    "deberta-v3-xsmall-mrqa": "VMware/deberta-v3-xsmall-mrqa",
    "deberta-v3-base-mrqa": "VMware/deberta-v3-base-mrqa",
    "deberta-v3-large-mrqa": "VMware/deberta-v3-large-mrqa",
    "electra-small-mrqa": "VMware/electra-small-mrqa",
    "electra-base-mrqa": "VMware/electra-base-mrqa",
    "electra-large-mrqa": "VMware/electra-large-mrqa",
    "minilmv2-l6-h384-from-bert-large-mrqa": "VMware/minilmv2-l6-h384-from-bert-large-mrqa",
    "minilmv2-l6-h768-from-bert-large-mrqa": "VMware/minilmv2-l6-h768-from-bert-large-mrqa",
    "minilmv2-l6-h384-from-roberta-large-mrqa": "VMware/minilmv2-l6-h384-from-roberta-large-mrqa",
    "minilmv2-l12-h384-from-roberta-large-mrqa": "VMware/minilmv2-l12-h384-from-roberta-large-mrqa",
    "minilmv2-l6-h768-from-roberta-large-mrqa": "VMware/minilmv2-l6-h768-from-roberta-large-mrqa",
    "roberta-base-mrqa": "VMware/roberta-base-mrqa",
    "roberta-large-mrqa": "VMware/roberta-large-mrqa",
    "tinyroberta-mrqa": "VMware/tinyroberta-mrqa",
    "tinyroberta-squad2": "deepset/tinyroberta-squad2",
    "tinyroberta-squad2-step1": "deepset/tinyroberta-squad2-step1",
    "roberta-base-squad2": "deepset/roberta-base-squad2",
    "roberta-large-squad2": "deepset/roberta-large-squad2",
    "tinyroberta-6l-768d": "deepset/tinyroberta-6l-768d",  # general-distilled; where step1 started
}

# The card's model-family table: (row, alias, eval EM, eval F1, test EM, test F1); macro averages over
# MRQA's in-domain ("eval") and out-of-domain ("test") dev sets. evaluate.py --help and the README print it.
CARD_FAMILY = [
    ("BERT-Tiny", "bert-tiny-mrqa", 22.78, 32.42, 10.18, 18.72),
    ("BERT-Base", "bert-base-mrqa", 64.48, 76.14, 48.89, 59.89),
    ("BERT-Large", "bert-large-mrqa", 69.52, 80.50, 55.00, 65.78),
    ("DeBERTa-v3-Extra-Small", "deberta-v3-xsmall-mrqa", 65.58, 77.17, 50.92, 62.58),
    ("DeBERTa-v3-Base", "deberta-v3-base-mrqa", 71.43, 82.59, 59.49, 70.46),
    ("DeBERTa-v3-Large", "deberta-v3-large-mrqa", 76.08, 86.23, 64.27, 75.22),
    ("ELECTRA-Small", "electra-small-mrqa", 57.63, 69.38, 38.68, 51.56),
    ("ELECTRA-Base", "electra-base-mrqa", 68.78, 80.16, 54.70, 65.80),
    ("ELECTRA-Large-Discriminator", "electra-large-mrqa", 74.15, 84.96, 62.35, 73.28),
    ("MiniLMv2-L6-H384-from-BERT-Large", "minilmv2-l6-h384-from-bert-large-mrqa", 59.31, 71.09, 41.78, 53.30),
    ("MiniLMv2-L6-H768-from-BERT-Large", "minilmv2-l6-h768-from-bert-large-mrqa", 64.27, 75.84, 49.05, 59.82),
    ("MiniLMv2-L6-H384-from-RoBERTa-Large", "minilmv2-l6-h384-from-roberta-large-mrqa", 59.27, 70.64, 42.95, 54.03),
    ("MiniLMv2-L12-H384-from-RoBERTa-Large", "minilmv2-l12-h384-from-roberta-large-mrqa", 64.58, 76.23, 51.28, 62.83),
    ("MiniLMv2-L6-H768-from-RoBERTa-Large", "minilmv2-l6-h768-from-roberta-large-mrqa", 65.80, 77.17, 51.72, 63.27),
    ("RoBERTa-Base", "roberta-base-mrqa", 69.06, 80.08, 55.53, 66.49),
    ("RoBERTa-Large", "roberta-large-mrqa", 74.08, 84.38, 62.20, 72.88),
    ("TinyRoBERTa", "tinyroberta-mrqa", 69.38, 80.07, 53.29, 64.16),
]


# The same numbers keyed by hub id, as evaluate.py looks them up: "dev" is the card's "Eval" (the six
# in-domain MRQA dev sets), "test" its "Test" (the six out-of-domain ones).
CARD_SCORES = {f"VMware/{alias}": {"dev": (a, b), "test": (c, d)} for _, alias, a, b, c, d in CARD_FAMILY}


def card_table() -> str:
    """The card's family table as aligned text (evaluate.py --help)."""
    lines = [f"{'row':<38}{'alias (VMware/<alias> on the hub)':<44}{'eval EM':>8}{'F1':>7}{'test EM':>9}{'F1':>7}"]
    lines += [f"{row:<38}{alias:<44}{a:>8.2f}{b:>7.2f}{c:>9.2f}{d:>7.2f}" for row, alias, a, b, c, d in CARD_FAMILY]
    return "\n".join(lines)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt")

# The key maps: HF name (without the family prefix "roberta.", "bert.", ...) -> our name. "{i}" is a layer
# index; each entry covers the ".weight" and ".bias" (or the embedding's ".weight") that follow it.
# BERT's names, which RoBERTa and ELECTRA share:
_BERT_EMBEDDINGS = {
    "embeddings.word_embeddings": "encoder.embeddings.word",
    "embeddings.position_embeddings": "encoder.embeddings.position",
    "embeddings.token_type_embeddings": "encoder.embeddings.token_type",
    "embeddings.LayerNorm": "encoder.embeddings.ln",
}
_BERT_LAYER = {
    "encoder.layer.{i}.attention.self.query": "encoder.layers.{i}.attn.query",
    "encoder.layer.{i}.attention.self.key": "encoder.layers.{i}.attn.key",
    "encoder.layer.{i}.attention.self.value": "encoder.layers.{i}.attn.value",
    "encoder.layer.{i}.attention.output.dense": "encoder.layers.{i}.attn.out",
    "encoder.layer.{i}.attention.output.LayerNorm": "encoder.layers.{i}.ln_attn",
    "encoder.layer.{i}.intermediate.dense": "encoder.layers.{i}.ffn.up",
    "encoder.layer.{i}.output.dense": "encoder.layers.{i}.ffn.down",
    "encoder.layer.{i}.output.LayerNorm": "encoder.layers.{i}.ln_ffn",
}
KEY_MAPS = {
    "roberta": {**_BERT_EMBEDDINGS, **_BERT_LAYER, "qa_outputs": "qa_outputs"},
    "bert": {**_BERT_EMBEDDINGS, **_BERT_LAYER, "qa_outputs": "qa_outputs"},
    "electra": {**_BERT_EMBEDDINGS, "embeddings_project": "encoder.embeddings.project", **_BERT_LAYER,
                "qa_outputs": "qa_outputs"},
    "deberta-v2": {
        "embeddings.word_embeddings": "encoder.embeddings.word",
        "embeddings.token_type_embeddings": "encoder.embeddings.token_type",  # only when type_vocab_size > 0
        "embeddings.LayerNorm": "encoder.embeddings.ln",
        "encoder.rel_embeddings": "encoder.rel_embeddings",
        "encoder.LayerNorm": "encoder.ln_rel",  # normalises rel_embeddings, not the hidden states
        "encoder.layer.{i}.attention.self.query_proj": "encoder.layers.{i}.attn.query",
        "encoder.layer.{i}.attention.self.key_proj": "encoder.layers.{i}.attn.key",
        "encoder.layer.{i}.attention.self.value_proj": "encoder.layers.{i}.attn.value",
        "encoder.layer.{i}.attention.output.dense": "encoder.layers.{i}.attn.out",
        "encoder.layer.{i}.attention.output.LayerNorm": "encoder.layers.{i}.ln_attn",
        "encoder.layer.{i}.intermediate.dense": "encoder.layers.{i}.ffn.up",
        "encoder.layer.{i}.output.dense": "encoder.layers.{i}.ffn.down",
        "encoder.layer.{i}.output.LayerNorm": "encoder.layers.{i}.ln_ffn",
        "qa_outputs": "qa_outputs",
    },
}
KEY_MAP = KEY_MAPS["roberta"]  # tinyqa's first name for RoBERTa's table
PREFIX = {"roberta": "roberta.", "bert": "bert.", "electra": "electra.", "deberta-v2": "deberta."}
# Keys a checkpoint may carry that the QA model does not use, explicitly, per family: pre-training heads
# (masked LM, next sentence, ELECTRA's discriminator and generator, DeBERTa's mask and LM predictions),
# poolers and classifier heads, the position/token-type id buffers some versions serialised, and
# DeBERTa-v3's absolute position table, which its config switches off (position_biased_input false).
_BUFFERS = r"|\.position_ids$|\.token_type_ids$"
DROPPED = {
    "roberta": re.compile(r"^(pooler\.|lm_head\.|classifier\.)" + _BUFFERS),
    "bert": re.compile(r"^(pooler\.|cls\.|classifier\.)" + _BUFFERS),
    "electra": re.compile(r"^(discriminator_predictions\.|generator_predictions\.|generator_lm_head\.|"
                          r"generator\.|classifier\.)" + _BUFFERS),
    "deberta-v2": re.compile(r"^(pooler\.|mask_predictions\.|lm_predictions\.|cls\.|classifier\.|"
                             r"embeddings\.position_embeddings\.)" + _BUFFERS),
}


def _our_to_hf(ours: str, family: str = "roberta") -> str:
    """encoder.layers.3.attn.query.weight -> roberta.encoder.layer.3.attention.self.query.weight"""
    stem, leaf = ours.rsplit(".", 1)
    for hf, our in KEY_MAPS[family].items():
        m = re.fullmatch(our.replace(".", r"\.").replace("{i}", r"(\d+)"), stem)
        if m:
            name = hf.replace("{i}", m.group(1)) if m.groups() else hf
            return name + "." + leaf if name == "qa_outputs" else PREFIX[family] + name + "." + leaf
    raise KeyError(f"no HF name for parameter {ours!r}: add it to KEY_MAPS[{family!r}]")


def _normalise_hf(key: str, family: str = "roberta") -> str:
    """Strip the optional family prefix (bare encoder checkpoints, e.g. BertModel's, have none) and rename
    the old TF-port LayerNorm gamma/beta to weight/bias, as transformers does."""
    key = key.removeprefix(PREFIX[family])
    return re.sub(r"(LayerNorm)\.gamma$", r"\1.weight", re.sub(r"(LayerNorm)\.beta$", r"\1.bias", key))


# --- where a checkpoint lives

OFFLINE_HINT = ("pass a local directory holding config.json and model.safetensors (or pytorch_model.bin) and the "
                "tokenizer files instead; set HF_HUB_OFFLINE=1 to use only the HF cache without trying the network")


@functools.lru_cache(maxsize=None)
def _hub_unreachable():
    """Why the Hugging Face Hub cannot be reached, or None. One TCP connect with a 3 s timeout, once per
    process: offline, huggingface_hub would otherwise retry each file for half a minute before failing.
    Behind a proxy a direct connect proves nothing, so there we let huggingface_hub try."""
    from huggingface_hub import constants
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        return f"cannot reach {url.hostname}: {e.strerror or e}"
    return None


def _hub_download(repo_id: str, filename: str, optional=False, flag=None):
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    name = f"{flag} {repo_id}" if flag else repr(repo_id)
    offline = constants.HF_HUB_OFFLINE or _hub_unreachable()
    try:
        # Offline, only the HF cache is looked at (no retries); online, huggingface_hub also checks for updates.
        return hf_hub_download(repo_id, filename, local_files_only=bool(offline))
    except LocalEntryNotFoundError:  # offline (or HF_HUB_OFFLINE=1) and not in the HF cache
        if optional and offline:
            return None  # e.g. model.safetensors absent from the cache: try pytorch_model.bin
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else (offline or "no connection to the Hugging Face Hub")
        raise TinyQAError(f"{name}: {filename} is not in the HF cache and cannot be downloaded ({why}); {OFFLINE_HINT}")
    except EntryNotFoundError:  # the repository exists but has no such file
        if optional:
            return None
        raise TinyQAError(f"{name}: the repository on the Hugging Face Hub has no {filename}")
    except RepositoryNotFoundError:
        raise TinyQAError(f"{name} is not a model on the Hugging Face Hub (or is private); "
                          f"known aliases: {', '.join(ALIASES)}")
    except Exception as e:  # connection refused, timeouts, HTTP errors
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise TinyQAError(f"{name}: could not download {filename} from the Hugging Face Hub "
                          f"({type(e).__name__}: {reason}); {OFFLINE_HINT}")


def looks_like_path(name: str) -> bool:
    """`./x`, `/abs`, `~/x`, `a/b/c`, `x/`, or `runs/distill` when `runs/` exists here: a local folder was
    meant, so a missing one is "no such directory", never a hub lookup. (`owner/name` alone is a hub id.)"""
    if name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and os.path.isdir(name.split("/")[0])


def resolve_dir(name_or_path: str, model=True, tokenizer=True, flag=None) -> str:
    """Return a local directory holding the checkpoint's files, downloading only what is asked for.
    `flag` (e.g. "--teacher") names the command-line flag in error messages."""
    what = f"{flag} {name_or_path}" if flag else name_or_path
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise TinyQAError(f"{what}: is a file; give the checkpoint's directory (config.json, model.safetensors)")
    if looks_like_path(name_or_path):
        raise TinyQAError(f"{what}: no such directory")
    repo_id = ALIASES.get(name_or_path, name_or_path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        head = f"{flag} {name_or_path}: unknown model" if flag else f"unknown model {name_or_path!r}"
        raise TinyQAError(f"{head}: not a local directory, not an alias "
                          f"({', '.join(ALIASES)}) and not a hub id like VMware/tinyroberta-mrqa")
    try:
        return _download_checkpoint(repo_id, model, tokenizer, flag)
    except TinyQAError as e:
        if name_or_path in ALIASES:
            raise
        raise TinyQAError(f"{e} (and there is no local directory {name_or_path})") from None


def _download_checkpoint(repo_id, model, tokenizer, flag):
    path = None
    if model:
        path = _hub_download(repo_id, "config.json", flag=flag)
        if not _hub_download(repo_id, "model.safetensors", optional=True, flag=flag):
            _hub_download(repo_id, "pytorch_model.bin", flag=flag)
    if tokenizer:  # tokenizer.json, else BERT's vocab.txt, else RoBERTa's vocab.json + merges.txt
        # (deepset/roberta-base-squad2 ships only vocab.json + merges.txt); tokenizer_config.json says
        # whether a vocab.txt is cased.
        _hub_download(repo_id, "tokenizer_config.json", optional=True, flag=flag)
        path = (_hub_download(repo_id, "tokenizer.json", optional=True, flag=flag)
                or _hub_download(repo_id, "vocab.txt", optional=True, flag=flag))
        if not path:
            _hub_download(repo_id, "vocab.json", flag=flag)
            path = _hub_download(repo_id, "merges.txt", flag=flag)
    return os.path.dirname(path)


# --- reading and writing

def read_state_dict(directory: str) -> dict:
    st = os.path.join(directory, "model.safetensors")
    bin_ = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(st):
        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError) as e:
            raise TinyQAError(f"{st}: not a readable safetensors file ({e}); the file is probably truncated: "
                              "download it again")
    if os.path.exists(bin_):
        try:  # weights_only: a .bin is a pickle, and we never execute code from a checkpoint
            return torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TinyQAError(f"{bin_}: cannot be read as a PyTorch state dict ({type(e).__name__}: {e})")
    raise TinyQAError(f"{directory}: no model.safetensors or pytorch_model.bin")


def load_state_dict_into(model: EncoderForQA, hf_state: dict, where: str = "checkpoint") -> list:
    """Copy an HF-named state dict into `model`, auditing every key and shape.

    Returns the list of our parameters that the checkpoint lacked and that were therefore left freshly
    initialised: only the QA head is allowed to be missing (a base LM checkpoint, e.g. to distil into).
    """
    ours, family = model.state_dict(), model.config.family
    hf_to_ours = {_our_to_hf(k, family).removeprefix(PREFIX[family]): k for k in ours}
    mapped, unexpected, shape_errors = {}, [], []
    for key, tensor in hf_state.items():
        norm = _normalise_hf(key, family)
        if norm in hf_to_ours:
            target = hf_to_ours[norm]
            if tuple(tensor.shape) != tuple(ours[target].shape):
                shape_errors.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(ours[target].shape)}")
            mapped[target] = tensor
        elif not DROPPED[family].search(norm):
            unexpected.append(key)
    missing = [k for k in ours if k not in mapped]
    head_only = all(k.startswith("qa_outputs.") for k in missing)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if missing and not head_only:
        problems.append(f"missing keys {[_our_to_hf(k, family) for k in missing][:10]}{' ...' if len(missing) > 10 else ''}")
    if shape_errors:
        problems.append("shape mismatches " + "; ".join(shape_errors[:10]))
    if problems:
        raise TinyQAError(f"{where}: does not match its config.json: " + "; ".join(problems))
    for k, t in mapped.items():  # a NaN or inf weight would give NaN logits: garbage answers, no error
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TinyQAError(f"{where}: tensor {_our_to_hf(k, model.config.family)} holds NaN or infinite values; the checkpoint "
                              "is broken (a diverged training run?): use another one")
    with torch.no_grad():
        for k, t in mapped.items():
            ours[k].copy_(t)
    return missing


def load_model_config(directory: str) -> EncoderConfig:
    """The EncoderConfig of a checkpoint directory's config.json, or one line naming the file and what is wrong."""
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise TinyQAError(f"{directory}: no config.json (expected an HF-layout checkpoint directory)")
    try:
        return EncoderConfig.from_json(cfg_path)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise TinyQAError(f"{cfg_path}: {e}")


def load_model(name_or_path: str, device="cpu", dtype=torch.float32, verbose=True) -> EncoderForQA:
    """An EncoderForQA (of the family its config.json names) in eval mode from a local HF-layout directory,
    an alias or a hub id."""
    check_device(device, dtype)
    directory = resolve_dir(name_or_path, model=True, tokenizer=False)
    model = EncoderForQA(load_model_config(directory))
    missing = load_state_dict_into(model, read_state_dict(directory), where=directory)
    if missing and verbose:
        print(f"notice: {name_or_path} has no QA head (qa_outputs); it was initialised fresh: train it before use",
              file=sys.stderr)
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model: EncoderForQA, directory: str, tokenizer=None):
    """Write config.json + model.safetensors under the family's HF names (and the tokenizer files if given,
    with the model's window length as model_max_length)."""
    os.makedirs(directory, exist_ok=True)
    state = {_our_to_hf(k, model.config.family): v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = os.path.join(directory, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "model.safetensors"))  # never leave a half-written checkpoint
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    if tokenizer is not None:
        from .tokenizer import save_tokenizer
        save_tokenizer(tokenizer, directory, model_max_length=model.config.max_window_len)
