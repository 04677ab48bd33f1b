"""Inference speed of tinyqa against transformers, measured side by side in ONE process.

    python benchmarks/bench_inference.py                         # 1,000 SQuAD dev questions, tinyroberta config
    python benchmarks/bench_inference.py --n 200 --rounds 2 --config ../shared/data/configs/roberta-base.json
    python benchmarks/bench_inference.py --accuracy-model demo-run/teacher --accuracy-data demo-run/dev.jsonl.gz

Contestants, alternated round by round so that machine noise hits all of them alike:
  tinyqa         the evaluate.py path end to end: featurize (batched tokenization, windows), length-sorted
                 batches, forward on their real tokens only (no padding on the CPU), vectorised n-best decode;
  tinyqa-int8    the same with --quantize int8 (dynamic int8 Linear layers);
  run_qa         transformers' RobertaForQuestionAnswering (sdpa) as transformers' examples/run_qa.py
                 evaluates: the fast tokenizer with stride and overflow, every window padded to
                 max_seq_len, batches in dataset order, its Python n-best post-processing;
  pipeline       transformers' question-answering pipeline, only when a transformers 4.x that has it is
                 installed (v5 removed it); same weights, same batch size.
All use the same random weights of --config and the real RoBERTa tokenizer, so speed, not accuracy, is
compared (--accuracy-model reports int8's EM/F1 change on a trained model).

Also printed: the fp32 matmul peak of this machine measured in the same run, the fraction of it that
tinyqa's forward FLOPs (exact, over the unpadded windows) reach end to end and in the forward alone,
and the peak RSS of `evaluate.py` on the same questions, run as a child process.
"""
import argparse
import collections
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import add_squad_speed_args, matmul_peak  # noqa: E402
from tinyqa.features import FeaturizerConfig, featurize  # noqa: E402
from tinyqa.decode import DecodeConfig  # noqa: E402
from tinyqa.cpu import pack_for_cpu, quantize_int8  # noqa: E402
from tinyqa.infer import predict, run_model  # noqa: E402
from tinyqa.metrics import score_datasets  # noqa: E402
from tinyqa.model import flops_per_token  # noqa: E402
from tinyqa.mrqa import read_mrqa  # noqa: E402
from tinyqa.tokenizer import load_tokenizer  # noqa: E402
from tinyqa.weights import load_model  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_squad_speed_args(p, "contestant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 contestant")
    p.add_argument("--no-rss", action="store_true", help="skip the evaluate.py peak-RSS child run")
    p.add_argument("--rss-only", action="store_true", help="only the evaluate.py peak-RSS child run")
    return p.parse_args()


# --- the machine's fp32 matmul peak, measured

# --- the transformers baseline as examples/pytorch/question-answering/run_qa.py evaluates

def run_qa_baseline(model, hf_tok, examples, fcfg, dcfg, batch_size):
    enc = hf_tok([ex.question.lstrip() for ex in examples], [ex.context for ex in examples],
                 truncation="only_second", max_length=fcfg.max_seq_len, stride=fcfg.doc_stride,
                 return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets = []
    for i in range(len(enc["input_ids"])):  # run_qa: offsets of non-context tokens set to None
        seq_ids = enc.sequence_ids(i)
        offsets.append([o if seq_ids[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])])
    ids = torch.tensor(enc["input_ids"])
    mask = torch.tensor(enc["attention_mask"])
    starts, ends = [], []
    with torch.inference_mode():
        for b in range(0, len(ids), batch_size):
            out = model(input_ids=ids[b:b + batch_size], attention_mask=mask[b:b + batch_size])
            starts.append(out.start_logits.numpy())
            ends.append(out.end_logits.numpy())
    starts, ends = np.concatenate(starts), np.concatenate(ends)
    # utils_qa.postprocess_qa_predictions: per example, per feature, n-best by argsort, Python double loop
    features_of = collections.defaultdict(list)
    for f, ex in enumerate(sample_map):
        features_of[ex].append(f)
    preds = {}
    for i, ex in enumerate(examples):
        best = None
        for f in features_of[i]:
            s, e, off = starts[f], ends[f], offsets[f]
            for si in np.argsort(s)[-1:-dcfg.n_best - 1:-1].tolist():
                for ei in np.argsort(e)[-1:-dcfg.n_best - 1:-1].tolist():
                    if si >= len(off) or ei >= len(off) or off[si] is None or off[ei] is None:
                        continue
                    if ei < si or ei - si + 1 > dcfg.max_answer_len:
                        continue
                    score = s[si] + e[ei]
                    if best is None or score > best[0]:
                        best = (score, off[si][0], off[ei][1])
        preds[ex.qid] = ex.context[best[1]:best[2]] if best else ""
    return preds


def transformers_pipeline(model, hf_tok):
    import transformers
    if int(transformers.__version__.split(".")[0]) >= 5:
        return None, f"transformers {transformers.__version__} has no question-answering pipeline (removed in v5)"
    from transformers import pipeline
    return pipeline("question-answering", model=model, tokenizer=hf_tok, device=-1), None


def main():
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import EncoderConfig as HFConfig
    from transformers import RobertaForQuestionAnswering, RobertaTokenizerFast
    import transformers

    examples = []
    for ex in read_mrqa(args.data):
        examples.append(ex)
        if len(examples) == args.n:
            break
    fcfg, dcfg = FeaturizerConfig(), DecodeConfig()
    tok = load_tokenizer(args.tokenizer)
    hf_tok = RobertaTokenizerFast.from_pretrained(args.tokenizer)

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="tinyqa-bench-")
    RobertaForQuestionAnswering(HFConfig.from_json_file(args.config)).save_pretrained(tmp)
    hf_tok.save_pretrained(tmp)
    hf_model = RobertaForQuestionAnswering.from_pretrained(tmp, attn_implementation="sdpa").eval()
    model = load_model(tmp, verbose=False).eval()
    packed = pack_for_cpu(load_model(tmp, verbose=False).eval())  # as evaluate.py runs it (where packing pays)
    model_int8 = None if args.no_int8 else quantize_int8(load_model(tmp, verbose=False).eval())
    pipe, why_no_pipe = transformers_pipeline(hf_model, hf_tok)

    features = featurize(examples, tok, fcfg, with_labels=False)
    lengths = [len(f.input_ids) for f in features]
    flops = sum(n * flops_per_token(model.config, n) for n in lengths)  # exact: each window unpadded
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{len(examples)} questions, {len(features)} windows (mean {np.mean(lengths):.0f} tokens, run_qa pads all "
          f"to {fcfg.max_seq_len}); {model.num_params() / 1e6:.1f}M parameters; {torch.get_num_threads()} threads")

    contestants = {
        "tinyqa": lambda: predict(packed, tok, examples, fcfg, dcfg, args.batch_size),
        "tinyqa forward only": lambda: run_model(packed, features, args.batch_size),
        "run_qa (padded)": lambda: run_qa_baseline(hf_model, hf_tok, examples, fcfg, dcfg, args.batch_size),
    }
    if model_int8 is not None:
        contestants["tinyqa int8"] = lambda: predict(model_int8, tok, examples, fcfg, dcfg, args.batch_size)
    if pipe is not None:
        qs = [{"question": ex.question, "context": ex.context} for ex in examples]
        contestants["pipeline"] = lambda: pipe(qs, batch_size=args.batch_size, max_seq_len=fcfg.max_seq_len,
                                               doc_stride=fcfg.doc_stride, max_question_len=fcfg.max_question_len)

    if not args.rss_only:
        race(args, contestants, examples, flops, why_no_pipe)
    if not args.no_rss:
        evaluate_rss(args, tmp)
    if args.accuracy_model:
        int8_accuracy(args, dcfg)


def race(args, contestants, examples, flops, why_no_pipe):
    # Same answers first: a faster wrong program is not a result.
    ours = {q: p.text for q, p in contestants["tinyqa"]().items()}
    theirs = contestants["run_qa (padded)"]()
    same = sum(ours[q] == theirs[q] for q in ours) / len(ours)
    print(f"tinyqa and run_qa give the same answer on {100 * same:.1f}% of questions (random weights: near-ties differ)")

    best = {k: float("inf") for k in contestants}
    peaks = []
    for r in range(args.rounds):
        peaks.append(matmul_peak())
        for name, fn in contestants.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{k} {len(examples) / best[k]:.1f} q/s" for k in contestants))
    peak = max(peaks)

    print(f"\n{'contestant':<22}{'questions/s':>12}{'vs run_qa':>11}{'vs pipeline':>13}")
    for name in contestants:
        qps = len(examples) / best[name]
        vs_runqa = best["run_qa (padded)"] / best[name]
        vs_pipe = f"{best['pipeline'] / best[name]:.2f}x" if "pipeline" in best else "n/a"
        print(f"{name:<22}{qps:>12.1f}{vs_runqa:>10.2f}x{vs_pipe:>13}")
    if "pipeline" not in contestants:
        print(f"pipeline: not measured: {why_no_pipe}; install transformers<5 in this environment to include it")
    print(f"\nfp32 matmul peak (2048^3 torch.mm, best of {args.rounds} x 2 s): {peak / 1e9:.1f} GFLOP/s")
    print(f"tinyqa forward FLOPs over unpadded windows: {flops / 1e9:.1f} GFLOP")
    print(f"  end to end:   {flops / best['tinyqa'] / 1e9:.1f} GFLOP/s = {100 * flops / best['tinyqa'] / peak:.1f}% of peak")
    print(f"  forward only: {flops / best['tinyqa forward only'] / 1e9:.1f} GFLOP/s = "
          f"{100 * flops / best['tinyqa forward only'] / peak:.1f}% of peak")
    print(f"peak RSS of this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def evaluate_rss(args, tmp):
    """evaluate.py alone, as a user runs it, on the same questions and the same random weights.
    The child reports its own VmHWM: ru_maxrss of children would count this big process's pages,
    which the fork copies before exec."""
    argv = [os.path.join(ROOT, "evaluate.py"), "--model", tmp, "--data", args.data, "--limit", str(args.n),
            "--quiet", "--batch-size", str(args.batch_size)]
    code = ("import atexit, runpy, sys; sys.argv = " + repr(argv) + "; atexit.register(lambda: "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)); "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    hwm = int(r.stderr.strip().splitlines()[-1].split()[1]) / 1024  # "VmHWM:  123456 kB"
    print(f"peak RSS (VmHWM) of evaluate.py on {args.n} questions: {hwm:.0f} MB")


def int8_accuracy(args, dcfg):
    dev = list(read_mrqa(args.accuracy_data))
    from tinyqa.answerer import QuestionAnswerer
    rows = {}
    for q in (None, "int8"):
        qa = QuestionAnswerer.from_pretrained(args.accuracy_model, quantize=q)
        preds = predict(qa.model, qa.tokenizer, dev, qa.fcfg, dcfg, args.batch_size)
        rows[q or "fp32"] = score_datasets({k: p.text for k, p in preds.items()}, {"data": dev})["macro"]
    d_em = rows["int8"]["exact_match"] - rows["fp32"]["exact_match"]
    d_f1 = rows["int8"]["f1"] - rows["fp32"]["f1"]
    print(f"\nint8 on {args.accuracy_model} ({len(dev)} questions): EM {rows['fp32']['exact_match']:.2f} -> "
          f"{rows['int8']['exact_match']:.2f} ({d_em:+.2f}), F1 {rows['fp32']['f1']:.2f} -> {rows['int8']['f1']:.2f} "
          f"({d_f1:+.2f})")


if __name__ == "__main__":
    main()
