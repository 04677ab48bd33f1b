"""How a checkpoint's tensors become the model's: one HF key map per family, its audit, load and save.

- `KEY_MAPS`: one table per family between HF names (`roberta.encoder.layer.3.attention.self.query.weight`,
  `deberta.encoder.layer.3.attention.self.query_proj.weight`) and ours (`encoder.layers.3.attn.query.weight`).
  Every checkpoint key is mapped or explicitly dropped (`DROPPED`, per family); anything else, and every
  shape mismatch, is an error listing the keys. Bare encoder checkpoints (no `bert.` prefix) load too.
- `load_model` / `save_pretrained`: HF-layout directories (config.json + model.safetensors) in and out,
  loadable by `transformers.AutoModelForQuestionAnswering`. Where a named checkpoint comes from (an alias,
  a hub id) is tinyqa/catalog.py's business.
Follows nanoGPT's `from_pretrained` (assert the key sets and every shape) and litgpt's visible key map.
"""
import json
import os
import re
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .catalog import resolve_dir
from .checks import check_device
from .errors import TinyQAError, missing
from .files import read_json
from .model import EncoderConfig, EncoderForQA
from .tokenizer import save_tokenizer

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
    for name in (st, bin_):
        if os.path.islink(name):
            raise TinyQAError(f"{name}: {missing(name)}")
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
            if not tensor.is_floating_point():  # copied into a float parameter it would be silently cast
                shape_errors.append(f"{key}: holds {str(tensor.dtype).removeprefix('torch.')} values, not "
                                    "floating-point weights")
            elif tuple(tensor.shape) != tuple(ours[target].shape):
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
        problems.append("wrong tensors " + "; ".join(shape_errors[:10]))
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
        raise TinyQAError(f"{directory}: no config.json (expected an HF-layout checkpoint directory)"
                          if not os.path.islink(cfg_path) else f"{cfg_path}: {missing(cfg_path)}")
    return read_config(cfg_path)


def read_config(path, flag=None) -> EncoderConfig:
    """An EncoderConfig from an HF config.json file (any family, from its model_type), or one line naming
    the file (and the flag that gave it) and what is wrong."""
    where = f"{flag} {path}" if flag else path
    try:
        config = read_json(path, "config.json", kind=object)
    except TinyQAError as e:
        raise TinyQAError(f"{flag} {e}" if flag else str(e)) from None
    if not isinstance(config, dict):
        raise TinyQAError(f"{where}: a config must be a JSON object, not a {type(config).__name__}")
    try:
        return EncoderConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise TinyQAError(f"{where}: {e}")


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
        save_tokenizer(tokenizer, directory, model_max_length=model.config.max_window_len)
