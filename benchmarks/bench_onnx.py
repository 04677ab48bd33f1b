"""CPU inference of tinyqa against ONNX Runtime and OpenVINO, measured side by side in ONE process.

    pip install -e ".[bench]"                                   # onnx, onnxruntime, openvino
    python benchmarks/bench_onnx.py                             # 1,000 SQuAD dev questions, tinyroberta config
    python benchmarks/bench_onnx.py --accuracy-model DIR --accuracy-data FILE    # int8 on a trained model

Every engine answers the same questions end to end with the same windows (tinyqa's featurizer, 384/128),
the same length-sorted, token-capped batches (tinyqa.infer.run_model's) and the same decoder; only the
forward pass differs. The ONNX engines take each batch padded to its longest window; tinyqa computes on the
real tokens only (forward_unpadded), as evaluate.py does. How much of a padded batch is padding depends on how
many questions are sorted together (--slice): the run prints it. Engines are interleaved slice by slice
(--slice questions) within each round; the best round counts:
  tinyqa            EncoderForQA in eager PyTorch as evaluate.py runs it: on the real tokens only, and on
                    AVX-512 CPUs its fp32 Linears prepacked for oneDNN, bias and GELU fused (pack_for_cpu)
  tinyqa int8       with --quantize int8 (dynamic int8 Linears, q|k|v fused into one, per-row weight scales)
  ORT               ONNX Runtime 1.x on `python -m tinyqa export`'s graph of the same weights
  ORT fused         ONNX Runtime on transformers' eager RobertaForQuestionAnswering export of the same
                    weights, after onnxruntime.transformers' optimizer (fused Attention, SkipLayerNorm,
                    BiasGelu: its fusions only match that graph)
  ORT int8          quantize_dynamic of the fused graph
  OpenVINO          OpenVINO's CPU plugin on tinyqa's graph, f32 inference precision forced
Reported per engine: questions/s, ratio to tinyqa, % of the fp32 matmul peak (measured in this run), the
largest logit difference from tinyqa fp32 over real tokens, and the share of questions whose answer equals
tinyqa fp32's (random weights give nearly flat logits, so this is a lower bound; --accuracy-model measures
it on a trained model).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import add_squad_speed_args, cpu_name, matmul_peak  # noqa: E402
from tinyqa.cli import positive_int  # noqa: E402
from tinyqa.decode import DecodeConfig, decode  # noqa: E402
from tinyqa.export import export_onnx  # noqa: E402
from tinyqa.features import FeaturizerConfig, collate, featurize, length_sorted_batches  # noqa: E402
from tinyqa.cpu import max_tokens_for, pack_for_cpu, packing_pays, quantize_int8  # noqa: E402
from tinyqa.infer import run_model  # noqa: E402
from tinyqa.metrics import score  # noqa: E402
from tinyqa.model import EncoderConfig, EncoderForQA, flops_per_token  # noqa: E402
from tinyqa.mrqa import read_mrqa  # noqa: E402
from tinyqa.tokenizer import load_tokenizer  # noqa: E402
from tinyqa.weights import load_model, save_pretrained  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_squad_speed_args(p, "engine")
    p.add_argument("--engines", nargs="+", default=None, help="only these engines (names as in the table)")
    p.add_argument("--slice", type=positive_int, default=25,
                   help="questions per slice: each round runs every engine on one slice in turn, then the next")
    return p.parse_args()


# --- the engines: each a function (features) -> (start logits, end logits), unpadded, in feature order

def torch_engine(model):
    return lambda features: run_model(model, features, ENGINE_BATCH)


def onnx_forward(run, names, pad_id):
    """An engine over a `run(feed) -> (start, end)` session: the same batches as run_model."""
    def forward(features):
        starts, ends = [None] * len(features), [None] * len(features)
        for idx in length_sorted_batches([len(f.input_ids) for f in features], ENGINE_BATCH, max_tokens_for("cpu")):
            b = collate([features[i] for i in idx], pad_id=pad_id)
            s, e = run({n: b[n].numpy() for n in names})
            for row, i in enumerate(idx):
                n = len(features[i].input_ids)
                starts[i], ends[i] = s[row, :n], e[row, :n]
        return starts, ends
    return forward


def ort_session(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return (lambda feed: sess.run(["start_logits", "end_logits"], feed)), names


def openvino_session(path, threads):
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                                               "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]

    def run(feed):
        out = request.infer(feed)
        return out[compiled.output("start_logits")], out[compiled.output("end_logits")]
    return run, names


def hf_fused_onnx(folder, path_plain, path_fused, cfg):
    """transformers' eager model of the same weights exported, then ORT's transformer optimizer."""
    import transformers
    from onnxruntime.transformers.optimizer import optimize_model
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(folder, attn_implementation="eager").eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask)
            return out.start_logits, out.end_logits

    ids = torch.randint(5, 1000, (2, 17))
    mask = torch.ones_like(ids)
    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "start_logits", "end_logits")}
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(hf).eval(), (ids, mask), path_plain, input_names=["input_ids", "attention_mask"],
                          output_names=["start_logits", "end_logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    opt = optimize_model(path_plain, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(path_fused)
    return fused


def ort_int8(path_in, path_out):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(path_in, path_out, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1})


ENGINE_BATCH = 64


def padding_share(examples, slice_size, tok, fcfg):
    """The share of padding among the tokens of run_model's padded batches, slice by slice."""
    real = padded = 0
    for i in range(0, len(examples), slice_size):
        lengths = [len(f.input_ids) for f in featurize(examples[i:i + slice_size], tok, fcfg, with_labels=False)]
        for idx in length_sorted_batches(lengths, ENGINE_BATCH, max_tokens_for("cpu")):
            real += sum(lengths[j] for j in idx)
            padded += len(idx) * max(lengths[j] for j in idx)
    return 1 - real / padded


def main():
    global ENGINE_BATCH
    args = get_args()
    ENGINE_BATCH = args.batch_size
    threads = torch.get_num_threads()
    work = tempfile.mkdtemp(prefix="tinyqa-bench-onnx-")
    tok = load_tokenizer(args.tokenizer)
    examples = [ex for _, ex in zip(range(args.n), read_mrqa(args.data))]
    fcfg, dcfg = FeaturizerConfig(), DecodeConfig()

    torch.manual_seed(0)
    cfg = EncoderConfig.from_json(args.config)
    model = EncoderForQA(cfg).eval()
    folder = os.path.join(work, "ckpt")
    save_pretrained(model, folder, tokenizer=tok)
    export_onnx(model, os.path.join(work, "tinyqa.onnx"))
    # tinyqa as evaluate.py runs it: fp32 Linears prepacked for oneDNN where that pays (AVX-512; infer.py)
    engines = {"tinyqa": torch_engine(pack_for_cpu(load_model(folder, verbose=False).eval())),
               "tinyqa int8": torch_engine(quantize_int8(load_model(folder, verbose=False).eval()))}
    run, names = ort_session(os.path.join(work, "tinyqa.onnx"), threads)
    engines["ORT"] = onnx_forward(run, names, cfg.pad_token_id)
    fused = hf_fused_onnx(folder, os.path.join(work, "hf.onnx"), os.path.join(work, "hf-fused.onnx"), cfg)
    run, names = ort_session(os.path.join(work, "hf-fused.onnx"), threads)
    engines["ORT fused"] = onnx_forward(run, names, cfg.pad_token_id)
    ort_int8(os.path.join(work, "hf-fused.onnx"), os.path.join(work, "hf-fused-int8.onnx"))
    run, names = ort_session(os.path.join(work, "hf-fused-int8.onnx"), threads)
    engines["ORT int8"] = onnx_forward(run, names, cfg.pad_token_id)
    run, names = openvino_session(os.path.join(work, "tinyqa.onnx"), threads)
    engines["OpenVINO"] = onnx_forward(run, names, cfg.pad_token_id)
    if args.engines:
        engines = {k: v for k, v in engines.items() if k in args.engines or k == "tinyqa"}

    import onnxruntime
    import openvino
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}; "
          f"{threads} threads; CPU: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}; "
          f"fp32 Linears {'prepacked for oneDNN' if packing_pays() else 'nn.Linear (MKL)'})")
    print(f"ORT's optimizer fused: {fused}")

    def end_to_end(engine, part=examples):
        features = featurize(part, tok, fcfg, with_labels=False)
        starts, ends = engine(features)
        return features, starts, ends, decode(part, features, starts, ends, dcfg.n_best, dcfg.max_answer_len)

    results = {name: end_to_end(engine) for name, engine in engines.items()}  # warm-up, and the answers
    ref_feats, ref_s, ref_e, ref_preds = results["tinyqa"]
    lengths = [len(f.input_ids) for f in ref_feats]
    flops = sum(n * flops_per_token(cfg, n) for n in lengths)
    print(f"{len(examples)} questions, {len(lengths)} windows (mean {np.mean(lengths):.0f} tokens); "
          f"{model.num_params() / 1e6:.1f}M parameters")
    print(f"padding: {100 * padding_share(examples, args.slice, tok, fcfg):.1f}% of the tokens in the padded batches of "
          f"{args.slice}-question slices (the ONNX engines compute them, tinyqa skips them)")
    # This VM's speed drifts by tens of percent over minutes, so each round interleaves the engines slice by
    # slice (args.slice questions, the engines' order rotated per slice): every engine's round time then
    # spans the same stretch of the machine's good and bad moments.
    slices = [examples[i:i + args.slice] for i in range(0, len(examples), args.slice)]
    best, peaks, names = {k: float("inf") for k in engines}, [], list(engines)
    for r in range(args.rounds):
        peaks.append(matmul_peak())
        spent = dict.fromkeys(engines, 0.0)
        for j, part in enumerate(slices):
            for name in names[j % len(names):] + names[:j % len(names)]:
                t = time.perf_counter()
                end_to_end(engines[name], part)
                spent[name] += time.perf_counter() - t
        best = {k: min(best[k], spent[k]) for k in engines}
        print(f"round {r + 1}: " + ", ".join(f"{k} {len(examples) / best[k]:.2f} q/s" for k in engines), flush=True)
    peak = max(peaks)
    print(f"\n{'engine':<14}{'q/s':>8}{'vs tinyqa':>11}{'% of peak':>11}{'max logit diff':>16}{'same answers':>14}")
    for name, (_, s, e, preds) in results.items():
        diff = max(max(np.abs(a - b).max() for a, b in zip(s, ref_s)), max(np.abs(a - b).max() for a, b in zip(e, ref_e)))
        same = np.mean([preds[q].text == ref_preds[q].text for q in ref_preds])
        print(f"{name:<14}{len(examples) / best[name]:>8.2f}{best['tinyqa'] / best[name]:>10.2f}x"
              f"{100 * flops / best[name] / peak:>10.1f}%{diff:>16.2e}{100 * same:>13.1f}%")
    print(f"fp32 matmul peak (2048^3 torch.mm): {peak / 1e9:.1f} GFLOP/s; forward FLOPs {flops / 1e9:.1f} GFLOP "
          "(unpadded windows, matmuls only)")
    if args.accuracy_model:
        accuracy(args, dcfg, threads, work)


def accuracy(args, dcfg, threads, work):
    """int8 against fp32 on a trained model: share of identical answers and the EM/F1 change."""
    dev = list(read_mrqa(args.accuracy_data))
    from tinyqa.infer import featurizer_config_of
    fcfg = featurizer_config_of(args.accuracy_model)
    tok = load_tokenizer(args.accuracy_model)
    model = load_model(args.accuracy_model, verbose=False).eval()
    path = os.path.join(work, "trained.onnx")
    export_onnx(model, path)
    ort_int8(path, path + ".int8")
    run, names = ort_session(path + ".int8", threads)
    engines = {"tinyqa fp32": torch_engine(pack_for_cpu(load_model(args.accuracy_model, verbose=False).eval())),
               "tinyqa int8": torch_engine(quantize_int8(load_model(args.accuracy_model, verbose=False).eval())),
               "ORT int8": onnx_forward(run, names, model.config.pad_token_id)}
    features = featurize(dev, tok, fcfg, with_labels=False)
    answers, scores = {}, {}
    for name, engine in engines.items():
        s, e = engine(features)
        answers[name] = {q: p.text for q, p in decode(dev, features, s, e, dcfg.n_best, dcfg.max_answer_len).items()}
        scores[name] = score(answers[name], dev)
    ref = answers["tinyqa fp32"]
    print(f"\non {args.accuracy_model} ({len(dev)} questions of {args.accuracy_data}):")
    for name in engines:
        same = np.mean([answers[name][q] == ref[q] for q in ref])
        print(f"{name:<14} EM {scores[name]['exact_match']:6.2f} F1 {scores[name]['f1']:6.2f}  "
              f"(F1 {scores[name]['f1'] - scores['tinyqa fp32']['f1']:+.2f}); same answers as fp32: {100 * same:.1f}%")


if __name__ == "__main__":
    main()
