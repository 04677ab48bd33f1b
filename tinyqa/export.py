"""`python -m tinyqa export --onnx DIR`: the QA model as ONNX, for deploying on ONNX Runtime or OpenVINO.

DIR gets `model.onnx` with the inputs the family reads, `input_ids` and `attention_mask` (and `token_type_ids`
for BERT and ELECTRA), int64 (batch, sequence), and the outputs `start_logits` and `end_logits`, float32
(batch, sequence), both axes dynamic: the layout of Hugging Face optimum's question-answering exports. Beside
it the checkpoint's config.json and tokenizer files, so DIR is what such a runtime needs.

It is torch.onnx's TorchScript exporter over tinyqa's own model (SDPA becomes ONNX MatMul/Softmax); where
onnxruntime is installed the export is checked against tinyqa on a padded batch before it is kept.
"""
import os
import shutil
import tempfile
import warnings

import torch

from .errors import TinyQAError


class _Logits(torch.nn.Module):
    """The model with plain tensor inputs and outputs, as an exporter wants it."""

    def __init__(self, model, with_types):
        super().__init__()
        self.model, self.with_types = model, with_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.model(input_ids, attention_mask, token_type_ids if self.with_types else None)
        return out.start_logits, out.end_logits


def uses_token_types(cfg) -> bool:
    """BERT and ELECTRA add a learned segment embedding; RoBERTa's single row and DeBERTa-v3's none are constant."""
    return cfg.type_vocab_size > 1


def example_batch(cfg, lengths=(17, 9), seed=0):
    """A padded batch of random ids (B, L): what the export is traced with and checked on."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, cfg.vocab_size, (n,), generator=g)
        mask[i, :n] = 1
        types[i, n // 2:n] = 1 if cfg.type_vocab_size > 1 else 0
    return ids, mask, types


def export_onnx(model, path, opset=17):
    """Write model (an EncoderForQA, fp32) to path as ONNX; returns the input names."""
    model = model.float().eval()  # eval: dropout off in the traced graph
    with_types = uses_token_types(model.config)
    ids, mask, types = example_batch(model.config)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    args = (ids, mask, types) if with_types else (ids, mask)
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["start_logits", "end_logits"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python scalars and the exporter's deprecation
        torch.onnx.export(_Logits(model, with_types).eval(), args, path, input_names=names,
                          output_names=["start_logits", "end_logits"], dynamic_axes=axes, opset_version=opset,
                          dynamo=False)
    return names


def check_with_onnxruntime(model, path, atol=1e-4):
    """Max |difference| of ONNX Runtime's logits from tinyqa's on a padded batch, or None without onnxruntime.
    Only real (unpadded) positions count: padded ones are never decoded."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids, mask, types = example_batch(model.config, lengths=(40, 23, 7), seed=1)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()}
    feed = {i.name: feed[i.name] for i in sess.get_inputs()}
    start, end = sess.run(["start_logits", "end_logits"], feed)
    with torch.no_grad():
        ref = model(ids, mask, types)
    keep = mask.bool()
    diff = max((torch.from_numpy(start) - ref.start_logits)[keep].abs().max().item(),
               (torch.from_numpy(end) - ref.end_logits)[keep].abs().max().item())
    if diff > atol:
        raise TinyQAError(f"{path}: ONNX Runtime's logits differ from tinyqa's by {diff:.3g} (> {atol}); "
                          "the export is not kept")
    return diff


def export_command(model_name, out, opset=17, log=print):
    """Export the checkpoint `model_name` (alias, hub id or folder) into the folder `out`, atomically."""
    from .catalog import resolve_dir
    from .weights import load_model
    directory = resolve_dir(model_name, flag="--model")
    model = load_model(directory, verbose=False)
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=".export-")
    try:
        path = os.path.join(tmp, "model.onnx")
        names = export_onnx(model, path, opset)
        diff = check_with_onnxruntime(model, path)
        for name in os.listdir(directory):  # config and tokenizer files beside the graph
            if name.endswith((".json", ".txt", ".model")) and os.path.isfile(os.path.join(directory, name)):
                shutil.copy(os.path.join(directory, name), os.path.join(tmp, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    except OSError as e:
        raise TinyQAError(f"--onnx {out}: cannot write ({e.strerror or e})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    checked = (f"ONNX Runtime matches tinyqa to {diff:.2g}" if diff is not None
               else "onnxruntime is not installed, so it was not checked")
    log(f"wrote {os.path.join(out, 'model.onnx')} (inputs {', '.join(names)}); {checked}")
    return os.path.join(out, "model.onnx")
