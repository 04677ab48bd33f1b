"""`python -m tinyqa export --onnx DIR`: the QA model as ONNX, for deploying on ONNX Runtime or OpenVINO.

DIR gets `model.onnx` with the inputs the family reads, `input_ids` and `attention_mask` (and `token_type_ids`
for BERT and ELECTRA), int64 (batch, sequence), and the outputs `start_logits` and `end_logits`, float32
(batch, sequence), both axes dynamic: the layout of Hugging Face optimum's question-answering exports. Beside
it the checkpoint's config.json and tokenizer files, so DIR is what such a runtime needs.

It is torch.onnx's TorchScript exporter over tinyqa's own model (SDPA becomes ONNX MatMul/Softmax); where
onnxruntime is installed the export is checked against tinyqa on a padded batch before it is kept.
"""
import importlib.util
import os
import shutil
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
        try:
            torch.onnx.export(_Logits(model, with_types).eval(), args, path, input_names=names,
                              output_names=["start_logits", "end_logits"], dynamic_axes=axes, opset_version=opset,
                              dynamo=False)
        except OSError:
            raise
        except Exception as e:  # the exporter's own errors: an operator or opset it cannot write
            raise TinyQAError(f"the ONNX exporter failed at opset {opset} ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:160]})")
    return names


def check_with_onnxruntime(model, path, atol=1e-4):
    """Max |difference| of ONNX Runtime's logits from tinyqa's on a padded batch, or None without onnxruntime.
    Only real (unpadded) positions count: padded ones are never decoded."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    ids, mask, types = example_batch(model.config, lengths=(40, 23, 7), seed=1)
    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()}
        start, end = sess.run(["start_logits", "end_logits"], {i.name: feed[i.name] for i in sess.get_inputs()})
    except Exception as e:  # onnxruntime's own errors: a graph or opset this onnxruntime cannot run
        raise TinyQAError(f"{path}: ONNX Runtime {ort.__version__} cannot run the export ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:160]}); try another --opset")
    with torch.no_grad():
        ref = model(ids, mask, types)
    keep = mask.bool()
    diff = max((torch.from_numpy(start) - ref.start_logits)[keep].abs().max().item(),
               (torch.from_numpy(end) - ref.end_logits)[keep].abs().max().item())
    if diff > atol:
        raise TinyQAError(f"{path}: ONNX Runtime's logits differ from tinyqa's by {diff:.3g} (> {atol}); "
                          "the export is not kept")
    return diff


# What an export folder holds: the graph, and the checkpoint's config and tokenizer files copied beside it.
EXPORT_SUFFIXES = (".onnx", ".json", ".txt", ".model")
# SDPA is exported as ONNX attention ops from opset 14 on; torch names the newest opset it can write.
MIN_OPSET = 14


def max_opset() -> int:
    from torch.onnx import _constants
    return getattr(_constants, "ONNX_MAX_OPSET", 20)


def export_command(model_name, out, opset=17, overwrite=False, log=print):
    """Export the checkpoint `model_name` (alias, hub id or folder) into the folder `out`, built beside it
    and renamed into place: `out` is new or empty, or with overwrite holds only an earlier export's files
    (so two models' tokenizer files never mix)."""
    from .catalog import resolve_dir
    from .features import check_model_fits
    from .files import building
    from .tokenizer import load_tokenizer
    from .weights import load_model
    if not MIN_OPSET <= opset <= max_opset():
        raise TinyQAError(f"--opset {opset}: tinyqa's attention needs opset {MIN_OPSET} or later, and this torch "
                          f"writes up to {max_opset()}")
    if importlib.util.find_spec("onnx") is None:
        raise TinyQAError("export needs the onnx package: pip install onnx onnxruntime (or tinyqa's [onnx] extra)")
    check_export_folder(out, overwrite)
    directory = resolve_dir(model_name, flag="--model")
    model = load_model(directory, verbose=False)
    try:
        tokenizer = load_tokenizer(directory)
    except TinyQAError as e:
        raise TinyQAError(f"--model {model_name}: the export needs the checkpoint's tokenizer beside it ({e})")
    check_model_fits(model.config, tokenizer, model.config.max_window_len)  # vocabulary, pad id, token types
    with building(os.path.abspath(out).rstrip(os.sep), lambda folder: False) as tmp:
        path = os.path.join(tmp, "model.onnx")
        names = export_onnx(model, path, opset)
        diff = check_with_onnxruntime(model, path)
        for name in os.listdir(directory):  # config and tokenizer files beside the graph
            if name.endswith(EXPORT_SUFFIXES[1:]) and os.path.isfile(os.path.join(directory, name)):
                shutil.copy(os.path.join(directory, name), os.path.join(tmp, name))
    checked = (f"ONNX Runtime matches tinyqa to {diff:.2g}" if diff is not None
               else "onnxruntime is not installed, so it was not checked")
    log(f"wrote {os.path.join(out, 'model.onnx')} (inputs {', '.join(names)}); {checked}")
    return os.path.join(out, "model.onnx")


def check_export_folder(out, overwrite):
    if os.path.exists(out) and not os.path.isdir(out):
        raise TinyQAError(f"--onnx {out}: exists and is not a directory")
    held = os.listdir(out) if os.path.isdir(out) else []
    if held and not overwrite:
        raise TinyQAError(f"--onnx {out}: is not empty; pass --overwrite to replace an earlier export there, "
                          "or choose a new folder")
    foreign = [n for n in held if not (n.endswith(EXPORT_SUFFIXES) and os.path.isfile(os.path.join(out, n)))]
    if foreign:
        raise TinyQAError(f"--onnx {out}: holds {foreign[0]}, which no export writes; --overwrite replaces only an "
                          "earlier export: choose a new folder")
