"""Where checkpoints come from and how their keys become ours: aliases, hub download, safetensors I/O.

- `resolve_dir(name_or_path)`: a local directory as is; an alias or hub id downloaded through
  `huggingface_hub` (only the files needed; the HF cache and HF_HUB_OFFLINE are honoured).
- `KEY_MAP`: the one table between HF names (`roberta.encoder.layer.3.attention.self.query.weight`)
  and ours (`encoder.layers.3.attn.query.weight`). Every checkpoint key is mapped or explicitly
  dropped (`DROPPED`); anything else, and every shape mismatch, is an error listing the keys.
- `load_model` / `save_pretrained`: HF-layout directories (config.json + model.safetensors) in and out,
  loadable by `transformers.AutoModelForQuestionAnswering`.
Follows nanoGPT's `from_pretrained` (assert the key sets and every shape) and litgpt's visible key map.
"""
import json
import os
import re
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import TinyQAError
from .model import RobertaConfig, RobertaForQA

# Short names for the published checkpoints this project is about.
ALIASES = {
    "tinyroberta-mrqa": "VMware/tinyroberta-mrqa",
    "roberta-large-mrqa": "VMware/roberta-large-mrqa",
    "tinyroberta-squad2": "deepset/tinyroberta-squad2",
    "tinyroberta-squad2-step1": "deepset/tinyroberta-squad2-step1",
    "roberta-base-squad2": "deepset/roberta-base-squad2",
    "roberta-large-squad2": "deepset/roberta-large-squad2",
}

# The model card's macro-average EM / F1 of each VMware MRQA checkpoint, keyed by hub id: "dev" is the
# card's "Eval" (the six in-domain MRQA dev sets), "test" its "Test" (the six out-of-domain ones). From the
# card's model-family table; evaluate.py prints them beside what it measures on the same split.
CARD_SCORES = {
    "VMware/bert-tiny-mrqa": {"dev": (22.78, 32.42), "test": (10.18, 18.72)},
    "VMware/bert-base-mrqa": {"dev": (64.48, 76.14), "test": (48.89, 59.89)},
    "VMware/bert-large-mrqa": {"dev": (69.52, 80.50), "test": (55.00, 65.78)},
    "VMware/deberta-v3-xsmall-mrqa": {"dev": (65.58, 77.17), "test": (50.92, 62.58)},
    "VMware/deberta-v3-base-mrqa": {"dev": (71.43, 82.59), "test": (59.49, 70.46)},
    "VMware/deberta-v3-large-mrqa": {"dev": (76.08, 86.23), "test": (64.27, 75.22)},
    "VMware/electra-small-mrqa": {"dev": (57.63, 69.38), "test": (38.68, 51.56)},
    "VMware/electra-base-mrqa": {"dev": (68.78, 80.16), "test": (54.70, 65.80)},
    "VMware/electra-large-mrqa": {"dev": (74.15, 84.96), "test": (62.35, 73.28)},
    "VMware/minilmv2-l6-h384-from-bert-large-mrqa": {"dev": (59.31, 71.09), "test": (41.78, 53.30)},
    "VMware/minilmv2-l6-h768-from-bert-large-mrqa": {"dev": (64.27, 75.84), "test": (49.05, 59.82)},
    "VMware/minilmv2-l6-h384-from-roberta-large-mrqa": {"dev": (59.27, 70.64), "test": (42.95, 54.03)},
    "VMware/minilmv2-l12-h384-from-roberta-large-mrqa": {"dev": (64.58, 76.23), "test": (51.28, 62.83)},
    "VMware/minilmv2-l6-h768-from-roberta-large-mrqa": {"dev": (65.80, 77.17), "test": (51.72, 63.27)},
    "VMware/roberta-base-mrqa": {"dev": (69.06, 80.08), "test": (55.53, 66.49)},
    "VMware/roberta-large-mrqa": {"dev": (74.08, 84.38), "test": (62.20, 72.88)},
    "VMware/tinyroberta-mrqa": {"dev": (69.38, 80.07), "test": (53.29, 64.16)},
}

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")

# HF name (without the "roberta." prefix) -> our name. "{i}" is a layer index; each entry covers the
# ".weight" and ".bias" (or the embedding's ".weight") that follow it.
KEY_MAP = {
    "embeddings.word_embeddings": "encoder.embeddings.word",
    "embeddings.position_embeddings": "encoder.embeddings.position",
    "embeddings.token_type_embeddings": "encoder.embeddings.token_type",
    "embeddings.LayerNorm": "encoder.embeddings.ln",
    "encoder.layer.{i}.attention.self.query": "encoder.layers.{i}.attn.query",
    "encoder.layer.{i}.attention.self.key": "encoder.layers.{i}.attn.key",
    "encoder.layer.{i}.attention.self.value": "encoder.layers.{i}.attn.value",
    "encoder.layer.{i}.attention.output.dense": "encoder.layers.{i}.attn.out",
    "encoder.layer.{i}.attention.output.LayerNorm": "encoder.layers.{i}.ln_attn",
    "encoder.layer.{i}.intermediate.dense": "encoder.layers.{i}.ffn.up",
    "encoder.layer.{i}.output.dense": "encoder.layers.{i}.ffn.down",
    "encoder.layer.{i}.output.LayerNorm": "encoder.layers.{i}.ln_ffn",
    "qa_outputs": "qa_outputs",
}
# Keys a checkpoint may carry that the QA model does not use: the pooler (next-sentence head), the
# masked-LM head of a base checkpoint, and position/token-type id buffers some versions serialised.
DROPPED = re.compile(r"^(pooler\.|lm_head\.|classifier\.)|\.position_ids$|\.token_type_ids$")


def _our_to_hf(ours: str) -> str:
    """encoder.layers.3.attn.query.weight -> roberta.encoder.layer.3.attention.self.query.weight"""
    stem, leaf = ours.rsplit(".", 1)
    for hf, our in KEY_MAP.items():
        m = re.fullmatch(our.replace(".", r"\.").replace("{i}", r"(\d+)"), stem)
        if m:
            name = hf.replace("{i}", m.group(1)) if m.groups() else hf
            return name + "." + leaf if name == "qa_outputs" else "roberta." + name + "." + leaf
    raise KeyError(f"no HF name for parameter {ours!r}: add it to KEY_MAP")


def _normalise_hf(key: str) -> str:
    """Strip the optional 'roberta.' prefix (bare RobertaModel checkpoints have none) and rename the
    old TF-port LayerNorm gamma/beta to weight/bias, as transformers does."""
    key = key.removeprefix("roberta.")
    return re.sub(r"(LayerNorm)\.gamma$", r"\1.weight", re.sub(r"(LayerNorm)\.beta$", r"\1.bias", key))


# --- where a checkpoint lives

def _hub_download(repo_id: str, filename: str, optional=False):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    offline_hint = ("if you are offline, pass a local directory holding config.json and model.safetensors "
                    "(or pytorch_model.bin) and the tokenizer files instead")
    try:
        return hf_hub_download(repo_id, filename)
    except LocalEntryNotFoundError:  # offline (or HF_HUB_OFFLINE=1) and not in the HF cache
        raise TinyQAError(f"could not download {filename} of {repo_id!r}: no connection to the Hugging Face Hub "
                          f"and not in the HF cache; {offline_hint}")
    except EntryNotFoundError:  # the repository exists but has no such file
        if optional:
            return None
        raise TinyQAError(f"{repo_id} on the Hugging Face Hub has no {filename}")
    except RepositoryNotFoundError:
        raise TinyQAError(f"{repo_id!r} is not a model on the Hugging Face Hub (or is private); "
                          f"known aliases: {', '.join(ALIASES)}")
    except Exception as e:  # connection refused, timeouts, HTTP errors
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise TinyQAError(f"could not download {filename} of {repo_id!r} from the Hugging Face Hub "
                          f"({type(e).__name__}: {reason}); {offline_hint}")


def resolve_dir(name_or_path: str, model=True, tokenizer=True) -> str:
    """Return a local directory holding the checkpoint's files, downloading only what is asked for."""
    if os.path.isdir(name_or_path):
        return name_or_path
    repo_id = ALIASES.get(name_or_path, name_or_path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise TinyQAError(f"unknown model {name_or_path!r}: not a local directory, not an alias "
                          f"({', '.join(ALIASES)}) and not a hub id like VMware/tinyroberta-mrqa")
    path = None
    if model:
        path = _hub_download(repo_id, "config.json")
        if not _hub_download(repo_id, "model.safetensors", optional=True):
            _hub_download(repo_id, "pytorch_model.bin")
    if tokenizer:  # deepset/roberta-base-squad2 ships only vocab.json + merges.txt
        path = _hub_download(repo_id, "tokenizer.json", optional=True) or path
        if not path or not path.endswith("tokenizer.json"):
            _hub_download(repo_id, "vocab.json")
            path = _hub_download(repo_id, "merges.txt")
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


def load_state_dict_into(model: RobertaForQA, hf_state: dict, where: str = "checkpoint") -> list:
    """Copy an HF-named state dict into `model`, auditing every key and shape.

    Returns the list of our parameters that the checkpoint lacked and that were therefore left freshly
    initialised: only the QA head is allowed to be missing (a base LM checkpoint, e.g. to distil into).
    """
    ours = model.state_dict()
    hf_to_ours = {_our_to_hf(k).removeprefix("roberta."): k for k in ours}
    mapped, unexpected, shape_errors = {}, [], []
    for key, tensor in hf_state.items():
        norm = _normalise_hf(key)
        if norm in hf_to_ours:
            target = hf_to_ours[norm]
            if tuple(tensor.shape) != tuple(ours[target].shape):
                shape_errors.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(ours[target].shape)}")
            mapped[target] = tensor
        elif not DROPPED.search(norm):
            unexpected.append(key)
    missing = [k for k in ours if k not in mapped]
    head_only = all(k.startswith("qa_outputs.") for k in missing)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if missing and not head_only:
        problems.append(f"missing keys {[_our_to_hf(k) for k in missing][:10]}{' ...' if len(missing) > 10 else ''}")
    if shape_errors:
        problems.append("shape mismatches " + "; ".join(shape_errors[:10]))
    if problems:
        raise TinyQAError(f"{where}: does not match its config.json: " + "; ".join(problems))
    with torch.no_grad():
        for k, t in mapped.items():
            ours[k].copy_(t)
    return missing


def load_model(name_or_path: str, device="cpu", dtype=torch.float32, verbose=True) -> RobertaForQA:
    """A RobertaForQA in eval mode from a local HF-layout directory, an alias or a hub id."""
    directory = resolve_dir(name_or_path, model=True, tokenizer=False)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise TinyQAError(f"{directory}: no config.json (expected an HF-layout checkpoint directory)")
    try:
        cfg = RobertaConfig.from_json(cfg_path)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise TinyQAError(f"{cfg_path}: {e}")
    model = RobertaForQA(cfg)
    missing = load_state_dict_into(model, read_state_dict(directory), where=directory)
    if missing and verbose:
        print(f"notice: {name_or_path} has no QA head (qa_outputs); it was initialised fresh: train it before use",
              file=sys.stderr)
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model: RobertaForQA, directory: str, tokenizer=None):
    """Write config.json + model.safetensors under HF names (and tokenizer.json if given)."""
    os.makedirs(directory, exist_ok=True)
    state = {_our_to_hf(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = os.path.join(directory, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "model.safetensors"))  # never leave a half-written checkpoint
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    if tokenizer is not None:
        from .tokenizer import save_tokenizer
        save_tokenizer(tokenizer, directory)
