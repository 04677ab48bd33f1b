"""Training speed, measured side by side in ONE process.

    python benchmarks/bench_train.py                                      # small configs on CPU
    python benchmarks/bench_train.py --device cuda --student-config ../shared/data/configs/tinyroberta.json \
        --teacher-config ../shared/data/configs/roberta-large.json --precision bf16 --max-seq-len 384

Three comparisons, each alternated round by round so that machine noise hits both sides alike:
1. distillation with the teacher's logits read from the float16 cache vs the teacher run per batch
   (--teacher-on-the-fly), both through tinyqa.train.train() itself on the same synthetic MRQA data,
   timed by the loop's own examples/s log (the one-off cache computation is reported separately), and the
   intermediate stage (--stage intermediate: the teacher per batch with its hidden states and attention
   scores), with the share of its time spent in the teacher;
2. one optimizer step of tinyqa's EncoderForQA vs transformers' RobertaForQuestionAnswering (sdpa) with
   the same weights, batch, loss (tinyqa.losses.distillation_loss) and AdamW;
3. peak memory (VmHWM, or CUDA's max allocated) of each distillation variant, each run in its own process.
The default student/teacher sizes keep tinyroberta/roberta-large's forward FLOPs ratio (about 7x).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tinyqa.demo import model_config  # noqa: E402
from tinyqa.features import FeaturizerConfig, collate, featurize  # noqa: E402
from tinyqa.losses import distillation_loss  # noqa: E402
from tinyqa.model import EncoderConfig, EncoderForQA, flops_per_token  # noqa: E402
from tinyqa.mrqa import read_mrqa  # noqa: E402
from tinyqa.synthetic import make_dataset, train_tokenizer, write_mrqa  # noqa: E402
from tinyqa.tokenizer import save_tokenizer  # noqa: E402
from tinyqa import cli  # noqa: E402
from tinyqa.train import param_groups, train  # noqa: E402
from tinyqa.weights import load_model, save_pretrained  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student-config", help="HF config.json of the student (default: 2 x 128 on the synthetic vocab)")
    p.add_argument("--teacher-config", help="HF config.json of the teacher (default: 4 x 256)")
    p.add_argument("--contexts", type=int, default=400, help="synthetic training contexts")
    p.add_argument("--batch-size", type=int, default=32, help="windows per optimizer step")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per timed run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each side counts")
    p.add_argument("--max-seq-len", type=int, default=128, help="window length")
    p.add_argument("--doc-stride", type=int, default=32, help="window overlap")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype on CUDA")
    return p.parse_args()


def loop_examples_per_s(log_path, skip=3):
    """Median examples/s of a train() run's log.jsonl, leaving out the first steps (warm-up)."""
    rows = [json.loads(line) for line in open(log_path)]
    rates = [r["examples_per_s"] for r in rows if "examples_per_s" in r][skip:]
    return float(np.median(rates))


def loop_teacher_share(log_path, batch_size, skip=3):
    """Median share of an intermediate-stage run's step time spent in the teacher: each log row has the
    step's teacher seconds and examples/s, so the step took batch_size / examples_per_s seconds."""
    rows = [json.loads(line) for line in open(log_path)][skip:]
    return float(np.median([r["teacher_s"] * r["examples_per_s"] / batch_size for r in rows]))


def main():
    args = get_args()
    work = tempfile.mkdtemp(prefix="tinyqa-bench-train-")
    # --- data and models: the demo's generator, its tokenizer, random-weight teacher and student
    rows = make_dataset(args.contexts, 0, split="train")
    train_file = write_mrqa(os.path.join(work, "train.jsonl.gz"), rows)
    tok = train_tokenizer([r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]])
    save_tokenizer(tok, os.path.join(work, "tok"))
    V = tok.get_vocab_size()
    cfgs = {}
    for name, path, default in (("student", args.student_config, "2x128"), ("teacher", args.teacher_config, "4x256")):
        if path:
            with open(path) as f:
                d = json.load(f)
            d.update(vocab_size=V, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        else:
            d = model_config(default, V, args.max_seq_len)
        cfgs[name] = EncoderConfig(**{k: v for k, v in d.items() if k in EncoderConfig.__dataclass_fields__})
        torch.manual_seed(1)
        save_pretrained(EncoderForQA(cfgs[name]), os.path.join(work, name))
        save_tokenizer(tok, os.path.join(work, name))
        with open(os.path.join(work, f"{name}.json"), "w") as f:
            json.dump(d, f)
    s_cfg, t_cfg = cfgs["student"], cfgs["teacher"]
    ratio = flops_per_token(t_cfg, 100) / flops_per_token(s_cfg, 100)
    large = EncoderConfig(num_hidden_layers=24, hidden_size=1024, intermediate_size=4096, num_attention_heads=16)
    card_ratio = flops_per_token(large, 100) / flops_per_token(EncoderConfig(num_hidden_layers=6), 100)
    print(f"student {s_cfg.num_hidden_layers}x{s_cfg.hidden_size}, teacher {t_cfg.num_hidden_layers}x"
          f"{t_cfg.hidden_size}: teacher/student forward FLOPs per token {ratio:.1f}x (tinyroberta/roberta-large: "
          f"{card_ratio:.1f}x); device {args.device}, {torch.get_num_threads()} threads")

    # --- 1. cached teacher logits vs teacher on the fly, through train() itself
    common = ["--train", train_file, "--teacher", os.path.join(work, "teacher"), "--student",
              os.path.join(work, "student"), "--max-seq-len", str(args.max_seq_len), "--doc-stride",
              str(args.doc_stride), "--batch-size", str(args.batch_size), "--epochs", "1", "--save-every", "0",
              "--stop-after", str(args.steps), "--device", args.device, "--precision", args.precision, "--quiet"]
    cache = ["--teacher-cache", os.path.join(work, "cache")]
    variants = {"cached": cache, "on the fly": [*cache, "--teacher-on-the-fly"], "intermediate": ["--stage", "intermediate"]}
    teacher_share = {}
    with open(os.devnull, "w") as devnull:
        out, sys.stdout = sys.stdout, devnull  # train() talks; the table below is what counts
        try:
            t = time.perf_counter()
            train(cli.distill_args([*common, *cache, "--out", os.path.join(work, "warm")]))  # computes the cache
            first = time.perf_counter() - t
            best = dict.fromkeys(variants, 0.0)
            for r in range(args.rounds):
                for name, extra in variants.items():
                    run_dir = os.path.join(work, f"run-{r}-{name.replace(' ', '')}")
                    train(cli.distill_args([*common, *extra, "--out", run_dir]))
                    best[name] = max(best[name], loop_examples_per_s(os.path.join(run_dir, "log.jsonl")))
                    if name == "intermediate":
                        teacher_share[r] = loop_teacher_share(os.path.join(run_dir, "log.jsonl"), args.batch_size)
        finally:
            sys.stdout = out
    feats = featurize(list(read_mrqa(train_file)), tok, FeaturizerConfig(args.max_seq_len, args.doc_stride),
                      with_offsets=False)
    print(f"\n1. distillation through train(), {args.steps} steps of {args.batch_size} windows, best of {args.rounds}:")
    for name, v in best.items():
        label = "intermediate stage (teacher per batch)" if name == "intermediate" else f"teacher {name}"
        print(f"   {label:<38} {v:8.1f} examples/s  {v / args.batch_size:6.2f} steps/s")
    print(f"   cached / on the fly: {best['cached'] / best['on the fly']:.2f}x  (the cache of {len(feats)} windows "
          f"was built once, inside the first run of {first:.1f} s)")
    print(f"   intermediate / prediction on the fly: {best['intermediate'] / best['on the fly']:.2f}x; its teacher "
          f"forward passes took {100 * min(teacher_share.values()):.0f}-{100 * max(teacher_share.values()):.0f}% "
          "of its step time")

    # --- 2. tinyqa step vs transformers step, same weights, batch, loss and optimizer
    from transformers import AutoModelForQuestionAnswering
    hf = AutoModelForQuestionAnswering.from_pretrained(os.path.join(work, "student"), attn_implementation="sdpa")
    ours = load_model(os.path.join(work, "student"), verbose=False)
    rng = np.random.default_rng(0)
    batches = [collate([feats[i] for i in rng.choice(len(feats), args.batch_size, replace=False)], with_labels=True)
               for _ in range(args.steps)]
    teacher_logits = [(torch.randn(b["input_ids"].shape), torch.randn(b["input_ids"].shape)) for b in batches]
    dev = args.device
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def run(model, hf_style):
        model.to(dev).train()
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
        t = time.perf_counter()
        for b, (ts, te) in zip(batches, teacher_logits):
            b = {k: v.to(dev) for k, v in b.items()}
            with torch.autocast("cuda", dtype=amp) if amp and dev.startswith("cuda") else torch.autocast("cpu", enabled=False):
                if hf_style:
                    o = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                else:
                    o = model(b["input_ids"], b["attention_mask"])
            loss, _, _ = distillation_loss(o.start_logits.float(), o.end_logits.float(), ts.to(dev), te.to(dev),
                                           b["start_positions"], b["end_positions"], b["attention_mask"], 0.75, 1.5)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return args.steps / (time.perf_counter() - t)

    best2 = {"tinyqa": 0.0, "transformers": 0.0}
    for _ in range(args.rounds):
        best2["tinyqa"] = max(best2["tinyqa"], run(ours, False))
        best2["transformers"] = max(best2["transformers"], run(hf, True))
    print(f"\n2. one distillation step, same weights/batch/loss/AdamW, {args.steps} steps, best of {args.rounds}:")
    for name, v in best2.items():
        print(f"   {name:<13} {v:6.2f} steps/s  {v * args.batch_size:8.1f} examples/s")
    print(f"   tinyqa / transformers: {best2['tinyqa'] / best2['transformers']:.2f}x")

    # --- 3. peak memory of each variant, each in a fresh process (a process's peak only ever grows)
    print(f"\n3. peak memory of {args.steps} distillation steps, one process each:")
    for name, extra in variants.items():
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from tinyqa import cli; "
                "from tinyqa.train import train, peak_memory; "
                "a = cli.distill_args(sys.argv[3:]); train(a); print('PEAK', peak_memory(sys.argv[2]))")
        r = subprocess.run([sys.executable, "-c", code, ROOT, args.device, *common, *extra, "--out",
                            os.path.join(work, f"mem-{name.replace(' ', '')}")], capture_output=True, text=True)
        peak = next((line[5:] for line in r.stdout.splitlines() if line.startswith("PEAK ")), r.stderr[-300:])
        print(f"   {name:<13} {peak}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
