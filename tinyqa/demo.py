"""`python -m tinyqa demo`: the whole system, offline, in a few minutes on a laptop CPU.

1. generate a seeded synthetic MRQA dataset (train and dev .jsonl.gz with headers; tinyqa/synthetic.py);
2. train a byte-level BPE tokenizer on it with `tokenizers`;
3. train a teacher (2 layers x 128) from random weights with train_finetune's loop;
4. distil a student of half the width (2 x 64) from it with train_distill's loop (teacher logits cached
   once), and train the same student from the same initialisation with CE only, on the same budget
   (data, steps, lr schedule, seed);
5. evaluate all of them, and the untrained student they start from, with evaluate's code and print
   parameters, EM, F1 and questions/s, and whether distillation beat CE-only (the measured difference).

Measured on a 2-core CPU with the defaults: about 140 s in all; teacher F1 94.7, CE-only student 93.6,
distilled student 93.6 to 93.9 (two runs whose cached teacher logits differed only by float rounding). The
data is easy enough that a 2 x 64 model nearly matches its teacher, so at this size distillation's gain is
within run-to-run noise; at a third of the data (tests/test_demo.py) it is several F1 points.
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

from .checks import learning_rate, nonneg_int, positive_int, seed_int
from .features import FeaturizerConfig
from .infer import QuestionAnswerer, predict
from .metrics import score_datasets
from .model import RobertaConfig, RobertaForQA
from .mrqa import read_mrqa
from .synthetic import make_dataset, train_tokenizer, write_mrqa
from .tokenizer import save_tokenizer
from .train import HelpFormatter, build_parser, train
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
    p.add_argument("--student-epochs", type=positive_int, default=3, help="epochs of both students (the same budget)")
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
    out = args.out
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()

    # --- data: distractor people in every context, several phrasings per question, a few long contexts
    shape = dict(people=(2, 3), facts=(1, 2), long_fraction=0.05, long_people=(6, 8), filler=0.1, shared_facts=0.1)
    train_rows = make_dataset(args.train_contexts, args.seed, split="train", **shape)
    dev_rows = make_dataset(args.dev_contexts, args.seed + 1, split="dev", **shape)
    train_file = write_mrqa(os.path.join(out, "train.jsonl.gz"), train_rows, "Synthetic", "train")
    dev_file = write_mrqa(os.path.join(out, "dev.jsonl.gz"), dev_rows, "Synthetic", "dev")
    print(f"data: {sum(len(r['qas']) for r in train_rows)} train and {sum(len(r['qas']) for r in dev_rows)} dev "
        f"questions in {out}/")

    # --- tokenizer
    tok = train_tokenizer([r["context"] for r in train_rows] + [q["question"] for r in train_rows for q in r["qas"]])
    tok_dir = os.path.join(out, "tokenizer")
    save_tokenizer(tok, tok_dir)
    for name, size in (("teacher", args.teacher_size), ("student", args.student_size)):
        with open(os.path.join(out, f"{name}-config.json"), "w") as f:
            json.dump(model_config(size, tok.get_vocab_size(), args.max_seq_len), f, indent=2)

    common = ["--train", str(train_file), "--tokenizer", tok_dir, "--max-seq-len", str(args.max_seq_len),
              "--doc-stride", str(args.doc_stride), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--warmup-proportion", "0.1", "--seed", str(args.seed), "--save-every", "0", "--device", "cpu",
              "--overwrite",  # the demo owns its subfolders: a second demo run replaces the first
              *(["--quiet"] if args.quiet else [])]
    finetune, distill = build_parser(False), build_parser(True)  # the card's w 0.75 and T 1.5 stay
    dirs = {k: os.path.join(out, k) for k in ("teacher", "student-distilled", "student-ce", "student-init")}
    timings = {"student-init": 0.0}

    # The students' common starting point, saved to be scored too: train() seeds torch with --seed right
    # before it builds a model from --init-config, so this is the exact init both students start from.
    torch.manual_seed(args.seed)
    save_pretrained(RobertaForQA(RobertaConfig.from_json(os.path.join(out, "student-config.json"))),
                    dirs["student-init"], tokenizer=tok)
    with open(os.path.join(dirs["student-init"], "args.json"), "w") as f:  # its window settings, as train() writes
        json.dump({"init": f"random, seed {args.seed}", "max_seq_len": args.max_seq_len,
                   "doc_stride": args.doc_stride,
                   "max_query_length": FeaturizerConfig().max_query_length}, f, indent=2)

    # --- teacher (train_finetune's loop, from random weights)
    print(f"\n== teacher {args.teacher_size}: span cross-entropy, {args.teacher_epochs} epochs")
    t = time.perf_counter()
    train(finetune.parse_args([*common, "--init-config", os.path.join(out, "teacher-config.json"),
                               "--epochs", str(args.teacher_epochs), "--out", dirs["teacher"]]))
    timings["teacher"] = time.perf_counter() - t

    # --- students: the same init (seed) and budget; one learns from the teacher, one from the labels only
    print(f"\n== student {args.student_size}: distilled from the teacher (w 0.75, T 1.5), {args.student_epochs} epochs")
    t = time.perf_counter()
    train(distill.parse_args([*common, "--teacher", dirs["teacher"], "--init-config",
                              os.path.join(out, "student-config.json"), "--epochs", str(args.student_epochs),
                              "--teacher-cache", os.path.join(out, "teacher-logits"), "--out", dirs["student-distilled"]]))
    timings["student-distilled"] = time.perf_counter() - t
    print(f"\n== student {args.student_size}: cross-entropy only, same budget")
    t = time.perf_counter()
    train(finetune.parse_args([*common, "--init-config", os.path.join(out, "student-config.json"),
                               "--epochs", str(args.student_epochs), "--out", dirs["student-ce"]]))
    timings["student-ce"] = time.perf_counter() - t

    # --- evaluate (evaluate.py's code path)
    dev = list(read_mrqa(dev_file))
    results = {}
    for name, d in dirs.items():
        qa = QuestionAnswerer.from_pretrained(d)
        t = time.perf_counter()
        preds = predict(qa.model, qa.tokenizer, dev, qa.fcfg, batch_size=64)
        qps = len(dev) / (time.perf_counter() - t)
        m = score_datasets({q: p.text for q, p in preds.items()}, {"Synthetic": dev})["macro"]
        results[name] = {"parameters": qa.model.num_params(), "exact_match": m["exact_match"], "f1": m["f1"],
                         "questions_per_s": qps, "train_seconds": timings[name]}
    results["distillation_beats_ce_only"] = {k: results["student-distilled"][k] - results["student-ce"][k]
                                             for k in ("exact_match", "f1")}
    results["total_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    # --- the table
    print(f"\n{'model':<20}{'params':>10}{'EM':>8}{'F1':>8}{'questions/s':>13}{'train s':>9}")
    for name in dirs:
        r = results[name]
        print(f"{name:<20}{r['parameters']:>10,}{r['exact_match']:>8.2f}{r['f1']:>8.2f}{r['questions_per_s']:>13.1f}"
            f"{r['train_seconds']:>9.1f}")
    gain = results["distillation_beats_ce_only"]
    verdict = "beat" if gain["f1"] > 0 else "did not beat"
    print(f"\ndistillation {verdict} CE-only training of the same student: F1 {gain['f1']:+.2f}, EM {gain['exact_match']:+.2f}")
    ex = min(dev, key=lambda e: len(e.context))
    print(f"total {results['total_seconds']:.0f}s. Try:\n  python evaluate.py --model {dirs['student-distilled']} "
        f"--data {dev_file}\n  python -m tinyqa answer --model {dirs['teacher']} --question "
        f"\"{ex.question}\" --context \"{ex.context}\"")
    return results


if __name__ == "__main__":
    main()
