"""Distillation across tokenizers on the demo's synthetic data: does a teacher with ANOTHER tokenizer teach?

    python benchmarks/bench_cross_tokenizer.py                  # 3 seeds, about 12 minutes on 2 CPU cores

The demo's data and budget (tinyqa/demo.py: the students learn from a quarter of the training contexts, 10
epochs), two teachers of the same size trained the same way on all of it, one per tokenizer:
  - a RoBERTa-style teacher with the byte-level BPE the students use,
  - a BERT teacher with an uncased WordPiece trained on the same text (tinyqa/synthetic.py);
and per seed one RoBERTa/BPE student init trained three times on the same budget: with the span loss only,
distilled from the BPE teacher (same tokenizer: the teacher's logits), and distilled from the WordPiece
teacher (its probabilities carried to the student's tokens, tinyqa/token_map.py). Dev F1 of each, mean and
spread over the seeds, and each distilled arm minus the span-loss arm, seed by seed.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tinyqa import demo  # noqa: E402
from tinyqa.cli import distill_args, finetune_args, positive_int  # noqa: E402
from tinyqa.infer import predict  # noqa: E402
from tinyqa.metrics import score_datasets  # noqa: E402
from tinyqa.mrqa import read_mrqa  # noqa: E402
from tinyqa.synthetic import train_wordpiece  # noqa: E402
from tinyqa.tokenizer import save_tokenizer  # noqa: E402
from tinyqa.train import train  # noqa: E402
from tinyqa.answerer import QuestionAnswerer  # noqa: E402

ARMS = ("ce", "same-tokenizer", "other-tokenizer")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="cross-tokenizer-run", help="folder for data, tokenizers, checkpoints, results.json")
    p.add_argument("--seeds", type=positive_int, default=3, help="student seeds")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    own = p.parse_args(argv)
    args = demo.get_args(["--out", own.out, "--seeds", str(own.seeds), *(["--quiet"] if own.quiet else [])])
    return args


def wordpiece_teacher(args, files, common):
    """The WordPiece tokenizer (trained on the same text as the BPE) and a BERT teacher of the BPE teacher's
    size, trained the same way. Returns its folder."""
    rows = [r for r in read_mrqa(files["train"])]
    texts = list({ex.context: None for ex in rows}) + [ex.question for ex in rows]
    tok = train_wordpiece(texts, 2000)
    save_tokenizer(tok, os.path.join(args.out, "wordpiece"))
    cfg = demo.model_config(args.teacher_size, tok.get_vocab_size(), args.max_seq_len)
    cfg.update(model_type="bert", pad_token_id=0, type_vocab_size=2, max_position_embeddings=args.max_seq_len * 2)
    path = os.path.join(args.out, "bert-teacher-config.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    flags = [a if a != os.path.join(args.out, "tokenizer") else os.path.join(args.out, "wordpiece") for a in common]
    folder = os.path.join(args.out, "teacher-wordpiece")
    train(finetune_args([*flags, "--train", files["train"], "--init-config", path, "--epochs", str(args.teacher_epochs),
                         "--seed", str(args.seed), "--out", folder,
                         "--feature-store", os.path.join(args.out, "features-wordpiece")]))
    return folder


def f1_of(folder, dev):
    qa = QuestionAnswerer.from_pretrained(folder, prepack=False)
    preds = predict(qa.model, qa.tokenizer, dev, qa.fcfg, batch_size=64)
    return score_datasets({q: p.text for q, p in preds.items()}, {"Synthetic": dev})["macro"]["f1"]


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    files, tok = demo.make_data(args)
    common = ["--tokenizer", os.path.join(args.out, "tokenizer"), "--max-seq-len", str(args.max_seq_len),
              "--doc-stride", str(args.doc_stride), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--warmup-proportion", "0.1", "--save-every", "0", "--device", "cpu",
              "--feature-store", os.path.join(args.out, "features"), "--overwrite", *(["--quiet"] if args.quiet else [])]
    teachers = {"same-tokenizer": os.path.join(args.out, "teacher-bpe")}
    train(finetune_args([*common, "--train", files["train"], "--init-config", os.path.join(args.out, "teacher-config.json"),
                         "--epochs", str(args.teacher_epochs), "--seed", str(args.seed), "--out", teachers["same-tokenizer"]]))
    teachers["other-tokenizer"] = wordpiece_teacher(args, files, common)
    dev = list(read_mrqa(files["dev"]))
    results = {"teachers": {k: f1_of(d, dev) for k, d in teachers.items()}, "students": {a: [] for a in ARMS}}
    for k in range(args.seeds):
        seed = args.seed + k
        student = [*common, "--train", files["students"], "--epochs", str(args.student_epochs), "--seed", str(seed),
                   "--init-config", os.path.join(args.out, "student-config.json")]
        for arm in ARMS:
            out = os.path.join(args.out, f"student-{arm}-seed{seed}")
            if arm == "ce":
                train(finetune_args([*student, "--out", out]))
            else:
                train(distill_args([*student, "--out", out, "--teacher", teachers[arm], "--teacher-cache",
                                    os.path.join(args.out, f"teacher-cache-{arm}")]))
            results["students"][arm].append(f1_of(out, dev))
    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report(results)
    return results


def report(results):
    print(f"\ndev F1 of the teachers: BPE {results['teachers']['same-tokenizer']:.2f}, "
          f"WordPiece {results['teachers']['other-tokenizer']:.2f}")
    ce = results["students"]["ce"]
    for arm in ARMS:
        f1 = results["students"][arm]
        line = f"student, {arm:<16} F1 {demo.fmt(demo.spread(f1))}"
        if arm != "ce":
            gain = demo.spread([a - b for a, b in zip(f1, ce)])
            line += f"   minus span-loss-only, seed by seed: {gain['mean']:+.2f} ({gain['min']:+.2f} .. {gain['max']:+.2f})"
        print(line)
    print(f"total {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
