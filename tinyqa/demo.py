"""`python -m tinyqa demo`: the whole system, offline, in about six minutes on a 2-core CPU.

1. generate a seeded synthetic MRQA dataset (train and dev .jsonl.gz with headers; tinyqa/synthetic.py);
2. train a byte-level BPE tokenizer on it with `tokenizers`;
3. train a teacher (2 layers x 128) from random weights with train_finetune's loop on all the training data;
4. per seed (--seeds, default 3), a student of half the width (2 x 64) learns from the first quarter of
   the training contexts only (--student-contexts): once distilled from the teacher with train_distill's
   loop (w 0.75, T 1.5, the teacher's logits cached once), once with the span loss only, from the same
   initialisation on the same budget (data, steps, lr schedule, seed);
5. evaluate all of them, and the untrained students they start from, with evaluate's code; print
   parameters, EM, F1 and questions/s, the students' mean and spread over the seeds, and whether
   distillation beat CE-only training on every seed, lost on every seed, or neither.

Why the students learn from a quarter of the data: with all of it, a 2 x 64 student trained on the labels
alone reaches the teacher. This data has one unambiguous answer span per question, so the teacher's soft
targets carry little the labels do not, and a teacher no better than the student's own ceiling can only
pull it down. A student that cannot reach the teacher alone is where distillation has something to give.
Three seeds may not settle it: what decides a small student here is mostly whether its run finds the
name-matching the questions need, which varies by seed more than the two losses differ, so the demo prints
the spread beside the mean and names no winner unless every seed agrees (docs/benchmarks.md has runs).
The data: 3,000 contexts of 2-3 people with 1-2 facts each, 5% with 6-8 people needing several windows;
every person's facts are distractors for the questions about the others, and in 10% of short contexts
(and all long ones) several people share a kind of fact, so only the name tells the answer apart.
Everything lands in --out as HF-layout checkpoints that `evaluate.py --model DIR` and
`python -m tinyqa answer --model DIR` accept.
"""
import argparse
import json
import os
import time

import torch

from .answerer import QuestionAnswerer
from .cli import HelpFormatter, distill_args, finetune_args, learning_rate, nonneg_int, positive_int, seed_int
from .cpu import pack_for_cpu
from .features import FeaturizerConfig
from .infer import predict
from .metrics import score_datasets
from .model import EncoderConfig, EncoderForQA
from .mrqa import read_mrqa
from .synthetic import make_dataset, train_tokenizer, write_mrqa
from .tokenizer import save_tokenizer
from .train import train
from .weights import save_pretrained


def model_size(text):
    """LAYERSxHIDDEN, e.g. 2x128; the hidden size must split over the demo's 4 attention heads."""
    try:
        layers, hidden = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LAYERSxHIDDEN like 2x128, got {text!r}")
    if layers < 1 or hidden < 4 or hidden % 4:
        raise argparse.ArgumentTypeError(f"needs at least 1 layer and a hidden size divisible by 4, got {text}")
    return text


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tinyqa demo", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo-run", help="folder for the data, tokenizer, checkpoints and results.json")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the data, the inits and the data order")
    p.add_argument("--train-contexts", type=positive_int, default=3000, help="synthetic training contexts (about 3 questions each)")
    p.add_argument("--dev-contexts", type=positive_int, default=200, help="synthetic dev contexts")
    p.add_argument("--teacher-size", type=model_size, default="2x128", help="teacher LAYERSxHIDDEN")
    p.add_argument("--student-size", type=model_size, default="2x64", help="student LAYERSxHIDDEN")
    p.add_argument("--teacher-epochs", type=positive_int, default=3, help="teacher training epochs")
    p.add_argument("--student-contexts", type=positive_int, default=750,
                   help="training contexts the students learn from: the first N of the teacher's")
    p.add_argument("--student-epochs", type=positive_int, default=10, help="epochs of both students (the same budget)")
    p.add_argument("--seeds", type=positive_int, default=3, help="student seeds (init and data order) to run both students with")
    p.add_argument("--lr", type=learning_rate, default=2e-3, help="peak lr (from scratch, so far above the card's 3e-5)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per optimizer step")
    p.add_argument("--max-seq-len", type=positive_int, default=128, help="window length of the demo models")
    p.add_argument("--doc-stride", type=nonneg_int, default=32, help="window overlap")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def model_config(size, vocab_size, max_seq_len):
    layers, hidden = (int(x) for x in size.lower().split("x"))
    return dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                intermediate_size=4 * hidden, max_position_embeddings=max_seq_len + 2,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    files, tok = make_data(args)
    common = ["--tokenizer", os.path.join(args.out, "tokenizer"), "--max-seq-len", str(args.max_seq_len),
              "--doc-stride", str(args.doc_stride), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--warmup-proportion", "0.1", "--save-every", "0", "--device", "cpu",
              "--feature-store", os.path.join(args.out, "features"),
              "--overwrite",  # the demo owns its subfolders: a second demo run replaces the first
              *(["--quiet"] if args.quiet else [])]
    dirs, timings = train_all(args, files, tok, common)
    results = evaluate_all(dirs, timings, files["dev"], args.seeds)
    results["total_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_results(args, dirs, results, files["dev"])
    return results


def make_data(args):
    """The synthetic data: distractor people in every context, several phrasings per question, a few long
    contexts. The teacher learns from every training context; the students from the first --student-contexts
    only. Also the tokenizer trained on it, and the two model configs. Returns ({train, students, dev}, tok)."""
    out = args.out
    shape = dict(people=(2, 3), facts=(1, 2), long_fraction=0.05, long_people=(6, 8), filler=0.1, shared_facts=0.1)
    train_rows = make_dataset(args.train_contexts, args.seed, split="train", **shape)
    dev_rows = make_dataset(args.dev_contexts, args.seed + 1, split="dev", **shape)
    n_students = min(args.student_contexts, len(train_rows))
    files = {"train": write_mrqa(os.path.join(out, "train.jsonl.gz"), train_rows, "Synthetic", "train"),
             "students": write_mrqa(os.path.join(out, "train-students.jsonl.gz"), train_rows[:n_students],
                                    "Synthetic", "train"),
             "dev": write_mrqa(os.path.join(out, "dev.jsonl.gz"), dev_rows, "Synthetic", "dev")}
    count = lambda rows: sum(len(r["qas"]) for r in rows)  # noqa: E731
    print(f"data: {count(train_rows)} train questions (the students' share: {count(train_rows[:n_students])}) and "
          f"{count(dev_rows)} dev questions in {out}/")
    tok = train_tokenizer([r["context"] for r in train_rows] + [q["question"] for r in train_rows for q in r["qas"]])
    save_tokenizer(tok, os.path.join(out, "tokenizer"))
    for name, size in (("teacher", args.teacher_size), ("student", args.student_size)):
        with open(os.path.join(out, f"{name}-config.json"), "w") as f:
            json.dump(model_config(size, tok.get_vocab_size(), args.max_seq_len), f, indent=2)
    return files, tok


def train_all(args, files, tok, common):
    """The teacher (train_finetune's loop, from random weights, on all the training data), then per seed the
    same student init trained twice on the same budget: distilled from the teacher, and on the labels only.
    Returns ({name: checkpoint folder}, {name: training seconds})."""
    out, dirs, timings = args.out, {}, {}

    def run(name, argv, distill=False):
        dirs[name] = os.path.join(out, name)
        t = time.perf_counter()
        train((distill_args if distill else finetune_args)([*common, *argv, "--out", dirs[name]]))
        timings[name] = time.perf_counter() - t

    print(f"\n== teacher {args.teacher_size}: span cross-entropy on all training questions, {args.teacher_epochs} epochs")
    run("teacher", ["--train", files["train"], "--init-config", os.path.join(out, "teacher-config.json"),
                    "--epochs", str(args.teacher_epochs), "--seed", str(args.seed)])
    for k in range(args.seeds):
        seed, tag = args.seed + k, "" if k == 0 else f"-seed{k}"
        dirs[f"student-init{tag}"] = os.path.join(out, f"student-init{tag}")
        save_student_init(args, out, dirs[f"student-init{tag}"], seed, tok)
        student = ["--train", files["students"], "--epochs", str(args.student_epochs), "--seed", str(seed),
                   "--init-config", os.path.join(out, "student-config.json")]
        print(f"\n== student {args.student_size}, seed {seed}: distilled from the teacher (w 0.75, T 1.5)")
        run(f"student-distilled{tag}", [*student, "--teacher", dirs["teacher"], "--teacher-cache",
                                        os.path.join(out, "teacher-logits")], distill=True)
        print(f"\n== student {args.student_size}, seed {seed}: cross-entropy only, same budget")
        run(f"student-ce{tag}", student)
    return dirs, timings


def evaluate_all(dirs, timings, dev_file, seeds):
    """Every checkpoint scored on the dev file as evaluate.py runs it, and the students' spread over seeds."""
    dev = list(read_mrqa(dev_file))
    results = {}
    for name, d in dirs.items():
        qa = QuestionAnswerer.from_pretrained(d, prepack=False)
        n_params = qa.model.num_params()  # counted before packing: PackedLinear's weights are not Parameters
        qa.model = pack_for_cpu(qa.model)  # then run as evaluate.py runs it
        t = time.perf_counter()
        preds = predict(qa.model, qa.tokenizer, dev, qa.fcfg, batch_size=64)
        qps = len(dev) / (time.perf_counter() - t)
        m = score_datasets({q: p.text for q, p in preds.items()}, {"Synthetic": dev})["macro"]
        results[name] = {"parameters": n_params, "exact_match": m["exact_match"], "f1": m["f1"],
                         "questions_per_s": qps, "train_seconds": timings.get(name, 0.0)}
    summary = {kind: spread([results[n]["f1"] for n in dirs if n.startswith(f"student-{kind}")])
               for kind in ("distilled", "ce", "init")}
    gains = [results[f"student-distilled{t}"]["f1"] - results[f"student-ce{t}"]["f1"]
             for t in [""] + [f"-seed{k}" for k in range(1, seeds)]]
    summary["distilled_minus_ce"] = spread(gains)
    results["summary"] = summary
    return results


def print_results(args, dirs, results, dev_file):
    summary = results["summary"]
    print(f"\n{'model':<24}{'params':>10}{'EM':>8}{'F1':>8}{'questions/s':>13}{'train s':>9}")
    for name in dirs:
        r = results[name]
        print(f"{name:<24}{r['parameters']:>10,}{r['exact_match']:>8.2f}{r['f1']:>8.2f}{r['questions_per_s']:>13.1f}"
              f"{r['train_seconds']:>9.1f}")
    print(f"\nover {args.seeds} seed(s), dev F1 mean (min .. max): teacher {results['teacher']['f1']:.2f}; "
          f"distilled student {fmt(summary['distilled'])}; CE-only student {fmt(summary['ce'])}")
    g = summary["distilled_minus_ce"]
    verdict = ("beat" if g["min"] > 0 else "lost to" if g["max"] < 0 else "neither clearly beat nor lost to")
    print(f"distillation {verdict} CE-only training of the same student: F1 {g['mean']:+.2f} on average "
          f"({g['min']:+.2f} .. {g['max']:+.2f} over the seeds)")
    ex = min(read_mrqa(dev_file), key=lambda e: len(e.context))
    print(f"total {results['total_seconds']:.0f}s. Try:\n  python evaluate.py --model {dirs['student-distilled']} "
          f"--data {dev_file}\n  python -m tinyqa answer --model {dirs['teacher']} --question "
          f"\"{ex.question}\" --context \"{ex.context}\"")


def save_student_init(args, out, folder, seed, tok):
    """The students' common starting point, saved to be scored too: train() seeds torch with --seed right
    before it builds a model from --init-config, so this is the exact init both students of a seed start from."""
    torch.manual_seed(seed)
    save_pretrained(EncoderForQA(EncoderConfig.from_json(os.path.join(out, "student-config.json"))), folder,
                    tokenizer=tok)
    with open(os.path.join(folder, "args.json"), "w") as f:  # its window settings, as train() writes
        json.dump({"init": f"random, seed {seed}", "max_seq_len": args.max_seq_len, "doc_stride": args.doc_stride,
                   "max_question_len": FeaturizerConfig().max_question_len}, f, indent=2)


def spread(values):
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def fmt(s):
    return f"{s['mean']:.2f} ({s['min']:.2f} .. {s['max']:.2f})"


if __name__ == "__main__":
    main()
