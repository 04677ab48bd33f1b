"""The per-window costs that docs/scaling.md's estimates of the card's recipe are built from.

    python benchmarks/bench_scaling.py                                         # this CPU: fp32, a few steps each
    python benchmarks/bench_scaling.py --device cuda --precision bf16 --steps 20 --student-batch 96
                                                                               # a GPU's own numbers

Random weights at the card's window length (384 tokens, every window full: a random training batch of 96
holds a full window nearly always, so it pads to 384 anyway). Timed, each as the best of --rounds
alternating rounds of --steps:
1. student step: one optimizer step of the tinyroberta student (6 x 768) on --student-batch windows, as
   tinyqa/train.py takes it: forward, the card's loss against given teacher logits
   (tinyqa.losses.distillation_loss), backward, clipping, AdamW;
2. teacher forward: roberta-large (24 x 1024), inference mode, --teacher-batch windows: what the
   teacher-logit cache costs per window, once per run;
3. deberta forward: DeBERTa-v3-large (24 x 1024, relative attention), the same: the cross-tokenizer teacher;
4. student forward: tinyroberta, inference mode (evaluation's cost per window).
Each as windows/s, GFLOP a window (tinyqa.model.flops_per_token; a training step counted as 3 forwards)
and the GFLOP/s reached, beside the machine's fp32 matmul peak measured in the same run (CPU). Configs
come from ../shared/data/configs. Writes --out (JSON).
"""
import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import cpu_name, matmul_peak, shared_data  # noqa: E402
from tinyqa.losses import distillation_loss  # noqa: E402
from tinyqa.model import EncoderConfig, EncoderForQA, flops_per_token  # noqa: E402
from tinyqa.train import param_groups  # noqa: E402

CONFIGS = {"student": "configs/tinyroberta.json", "teacher": "configs/roberta-large.json",
           "deberta": "configs/family/deberta-v3-large-mrqa.json"}


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype (CUDA only)")
    p.add_argument("--seq-len", type=int, default=384, help="tokens a window")
    p.add_argument("--student-batch", type=int, default=8, help="windows a student step")
    p.add_argument("--teacher-batch", type=int, default=4, help="windows a teacher forward pass")
    p.add_argument("--steps", type=int, default=3, help="timed steps (or forward passes) a round, after one warm-up")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each counts")
    p.add_argument("--only", nargs="+", choices=["student_step", "teacher_forward", "deberta_forward",
                                                 "student_forward"], default=None, help="run only these")
    p.add_argument("--out", default="bench_scaling.json", help="JSON report")
    return p.parse_args()


def batch(cfg, n, seq_len, device, g):
    """n full windows of random token ids (never the pad id), their mask, types and span labels."""
    ids = torch.randint(5, cfg.vocab_size, (n, seq_len), generator=g)
    labels = torch.randint(1, seq_len, (2, n), generator=g).sort(dim=0).values
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(n, seq_len, dtype=torch.long, device=device),
            "token_type_ids": torch.zeros(n, seq_len, dtype=torch.long, device=device),
            "start": labels[0].to(device), "end": labels[1].to(device)}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def student_step(args, autocast):
    """A closure running one optimizer step of the student, and the windows it takes."""
    model = EncoderForQA(load(CONFIGS["student"])).to(args.device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=3e-5)
    g = torch.Generator().manual_seed(0)
    b = batch(model.config, args.student_batch, args.seq_len, args.device, g)
    t_start, t_end = (torch.randn(args.student_batch, args.seq_len, generator=g).to(args.device) for _ in range(2))

    def step():
        with autocast:
            out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            loss, _, _ = distillation_loss(out.start_logits.float(), out.end_logits.float(), t_start, t_end,
                                           b["start"], b["end"], b["attention_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, args.student_batch, model.config, 3


def forward(name, n):
    def make(args, autocast):
        model = EncoderForQA(load(CONFIGS[name])).to(args.device).eval()
        b = batch(model.config, n(args), args.seq_len, args.device, torch.Generator().manual_seed(0))

        @torch.inference_mode()
        def run():
            with autocast:
                model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        return run, n(args), model.config, 1
    return make


MEASURES = {"student_step": student_step,
            "teacher_forward": forward("teacher", lambda a: a.teacher_batch),
            "deberta_forward": forward("deberta", lambda a: a.teacher_batch),
            "student_forward": forward("student", lambda a: a.student_batch)}


def load(rel):
    path = os.path.join(shared_data(), rel)
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found: set TINYQA_SHARED to the folder holding data/configs")
    return EncoderConfig.from_json(path)


def main():
    args = get_args()
    cuda = torch.device(args.device).type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and args.precision == "bf16" else nullcontext()
    names = args.only or list(MEASURES)
    report = {"device": torch.cuda.get_device_name(args.device) if cuda else cpu_name(), "threads":
              torch.get_num_threads(), "torch": torch.__version__, "precision": args.precision if cuda else "fp32",
              "seq_len": args.seq_len, "date": time.strftime("%Y-%m-%d"), "results": {}}
    if not cuda:
        report["matmul_peak_gflops"] = round(matmul_peak() / 1e9, 1)
    runs = {}
    for name in names:  # built once, warmed up once; timed in alternating rounds
        fn, windows, cfg, passes = MEASURES[name](args, autocast)
        fn()
        sync(args.device)
        runs[name] = (fn, windows, passes * flops_per_token(cfg, args.seq_len, windows) * args.seq_len)
    rates = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, (fn, windows, _) in runs.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync(args.device)
            rates[name].append(windows * args.steps / (time.perf_counter() - t))
    for name, (_, _, flops) in runs.items():
        best = max(rates[name])
        report["results"][name] = {"windows_per_s": round(best, 3), "all_rounds": [round(r, 3) for r in rates[name]],
                                   "gflop_per_window": round(flops / 1e9, 2),
                                   "gflops_reached": round(best * flops / 1e9, 1)}
        print(f"{name:<16} {best:9.3f} windows/s  ({', '.join(f'{r:.3f}' for r in rates[name])})  "
              f"{flops / 1e9:7.1f} GFLOP a window  {best * flops / 1e9:7.1f} GFLOP/s")
    if "matmul_peak_gflops" in report:
        print(f"fp32 matmul peak {report['matmul_peak_gflops']} GFLOP/s; {report['device']}, "
              f"{report['threads']} threads")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
