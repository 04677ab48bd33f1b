"""Batched inference: examples -> windows -> logits -> answers, as evaluate.py and training's evaluation run it.

`predict` decodes with run_qa's n-best over logit sums (tinyqa/decode.py); the answer API
(tinyqa/answerer.py) runs the same windows and logits through the QA pipeline's decoder instead.

Windows are sorted by length before batching, so each batch is padded only to its own longest window; on
the CPU the layers then skip even that padding (EncoderForQA.forward_unpadded); logits are trimmed back to
each window's length before decoding.
"""
import os
from dataclasses import replace

import torch

from .cpu import max_tokens_for, unpadding_pays
from .decode import DecodeConfig, decode
from .features import FeaturizerConfig, check_model_fits, collate, featurize, length_sorted_batches
from .runs import read_args


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
            s, e = model.forward_unpadded(*inputs)
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
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "args.json")):
        saved = read_args(name_or_path, "the checkpoint's training arguments")
        cfg = FeaturizerConfig(**{k: saved[k] for k in ("max_seq_len", "doc_stride", "max_question_len")
                                  if isinstance(saved.get(k), int)})
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def predict(model, tokenizer, examples, fcfg=FeaturizerConfig(), dcfg=DecodeConfig(), batch_size=64,
            device="cpu", progress=False) -> dict:
    """{qid: Prediction} for a list of Examples."""
    features, starts, ends = forward_examples(model, tokenizer, examples, fcfg, batch_size, device, progress)
    return decode(examples, features, starts, ends, dcfg.n_best, dcfg.max_answer_len, dcfg.handle_impossible_answer,
                  dcfg.null_threshold)


def forward_examples(model, tokenizer, examples, fcfg=FeaturizerConfig(), batch_size=64, device="cpu",
                     progress=False):
    """The windows of the examples and their start and end logits: (features, starts, ends)."""
    check_model_fits(model.config, tokenizer, fcfg.max_seq_len)  # window length, vocabulary, pad id, types
    # (a quantised model keeps its config too)
    features = featurize(examples, tokenizer, fcfg, with_labels=False)
    starts, ends = run_model(model, features, batch_size, device, progress)
    return features, starts, ends
