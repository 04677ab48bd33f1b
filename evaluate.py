"""Evaluate an extractive QA model on MRQA files with the official EM/F1.

    python evaluate.py --split dev                      # in-domain dev (the card's "Eval"), downloaded
    python evaluate.py --model electra-small-mrqa --split dev   # any row of the card's family (table below)
    python evaluate.py --split test                     # out-of-domain dev (the card's "Test")
    python evaluate.py --model DIR --data a.jsonl.gz b.jsonl.gz --output preds.json --metrics metrics.json
    python evaluate.py --predictions preds.json --data SQuAD-dev.jsonl.gz   # score a file, no model
    python evaluate.py --model DIR --data dev-v2.0.json --allow-null --nbest nbest.json --per-question q.jsonl

Prints a table per dataset plus the macro average over datasets (MRQA's headline) and the micro average;
for a known checkpoint evaluated on a whole official split, the model card's numbers beneath.
--data also takes SQuAD v1.1 / v2.0 JSON files. A v2.0 file's unanswerable questions are scored by SQuAD
2.0's rules (an empty prediction is right) with --allow-null, and left out, with a notice, without it.
"""
import argparse
import json
import os
import sys
import time

import torch

from tinyqa.errors import TinyQAError, cli_errors
from tinyqa.decode import decode, decode_nbest
from tinyqa.infer import DecodeConfig, featurizer_config_of, forward_examples, predict
from tinyqa.metrics import example_scores, score_datasets
from tinyqa.mrqa import SPLITS, ReadReport, read_mrqa, split_files
from tinyqa.weights import ALIASES, CARD_SCORES
from tinyqa.train import HelpFormatter
from tinyqa.weights import card_table


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                epilog="The model card's family: --model takes the alias (macro EM/F1 as the card "
                                       "reports them; eval = --split dev, test = --split test):\n" + card_table())
    g = p.add_argument_group("data")
    g.add_argument("--split", choices=["dev", "test"], default=None,
                   help="official MRQA split to download and evaluate: dev = the six in-domain dev sets, "
                        "test = the six out-of-domain dev sets (default: dev, unless --data is given)")
    g.add_argument("--data", nargs="+", metavar="FILE", help="local MRQA .jsonl or .jsonl.gz files instead of --split")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip malformed lines (counted and reported) instead of stopping at the first one")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions of each file")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tinyroberta-mrqa",
                   help="alias (the table below), hub id or local checkpoint directory of a RoBERTa, BERT, ELECTRA "
                        "or DeBERTa-v3 QA model")
    g.add_argument("--predictions", metavar="FILE",
                   help="score this existing {qid: answer} JSON file instead of running a model")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights/compute dtype")
    g.add_argument("--quantize", choices=["int8"], default=None,
                   help="CPU only: dynamic int8 quantisation of the Linear layers (faster, slightly less accurate)")
    g.add_argument("--batch-size", type=int, default=64, help="windows per forward pass (length-sorted)")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    g = p.add_argument_group("featurizer and decoder (model card defaults; a checkpoint trained by tinyqa "
                             "brings its own window settings in its args.json)")
    g.add_argument("--max-seq-len", type=int, default=None, help="tokens per window, special tokens included (card: 384)")
    g.add_argument("--doc-stride", type=int, default=None, help="overlap in tokens between consecutive windows (card: 128)")
    g.add_argument("--max-query-length", type=int, default=None, help="question tokens kept, the rest is cut (card: 64)")
    g.add_argument("--n-best", type=int, default=20, help="top start and end logits combined per window")
    g.add_argument("--max-answer-len", type=int, default=30, help="longest answer in tokens")
    g.add_argument("--allow-null", action="store_true", help="allow the empty answer (SQuAD 2.0-style models)")
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="FILE", help="write predictions as {qid: answer} JSON (the official format)")
    g.add_argument("--metrics", metavar="FILE", help="write {datasets, macro, micro} metrics JSON")
    g.add_argument("--nbest", metavar="FILE",
                   help="write run_qa's nbest_predictions.json: per qid the --n-best best answers with text, char "
                        "offsets (start, end), probability (softmax over the list) and start/end logits")
    g.add_argument("--per-question", metavar="FILE",
                   help="write one JSON line per question: qid, dataset, question, gold answers, prediction, "
                        "exact_match (0/1), f1 (0..1), for error analysis")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.split and args.data:
        p.error("give --split or --data, not both")
    return args


def load_examples(args):
    """{dataset name: [Example]} in file order; names come from each file's header, else its name."""
    files = args.data or split_files(args.split or "dev", progress=not args.quiet)
    by_dataset, report = {}, ReadReport()
    for path in files:
        examples = []
        for ex in read_mrqa(path, skip_bad=args.skip_bad, report=report):
            if args.limit is not None and len(examples) >= args.limit:
                break
            examples.append(ex)
        name, k = examples[0].dataset if examples else os.path.basename(path), 2
        while name in by_dataset:  # two files naming the same dataset stay apart
            name, k = f"{examples[0].dataset}#{k}", k + 1
        by_dataset[name] = examples
    if report.skipped:
        print(f"skipped {len(report.skipped)} malformed line(s):", file=sys.stderr)
        for s in report.skipped:
            print(f"  {s}", file=sys.stderr)
    return by_dataset


def read_predictions(path):
    try:
        with open(path, encoding="utf-8") as f:
            preds = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TinyQAError(f"{path}: cannot read predictions JSON ({e})")
    if not isinstance(preds, dict) or not all(isinstance(v, str) for v in preds.values()):
        raise TinyQAError(f"{path}: predictions must be a JSON object {{qid: answer string}}")
    return preds


def print_table(metrics):
    print(f"{'dataset':<22}{'questions':>10}{'EM':>9}{'F1':>9}")
    rows = list(metrics["datasets"].items()) + [("macro average", metrics["macro"]), ("micro average", metrics["micro"])]
    for name, r in rows:
        print(f"{name:<22}{r['total']:>10}{r['exact_match']:>9.2f}{r['f1']:>9.2f}")
    if "card" in metrics:  # the model card's macro average on the same split, beneath the measured one
        c = metrics["card"]
        print(f"{'model card (macro)':<22}{'':>10}{c['exact_match']:>9.2f}{c['f1']:>9.2f}   "
              f"{c['hub_id']}, {c['split']} split")


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_paths(args.nbest, args.per_question)
    by_dataset = load_examples(args)
    squad2 = unanswerable_questions(by_dataset, args.allow_null)
    all_examples = [ex for exs in by_dataset.values() for ex in exs]
    if args.predictions:
        answers = read_predictions(args.predictions)
        unknown = len(set(answers) - {ex.qid for ex in all_examples})
        if unknown:
            print(f"note: {unknown} predicted qids are not in the data and were ignored", file=sys.stderr)
    else:
        from tinyqa.infer import QuestionAnswerer
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        fcfg = featurizer_config_of(args.model, max_seq_len=args.max_seq_len, doc_stride=args.doc_stride,
                                    max_query_length=args.max_query_length)
        qa = QuestionAnswerer.from_pretrained(args.model, device=args.device, dtype=dtype, quantize=args.quantize)
        dcfg = DecodeConfig(args.n_best, args.max_answer_len, args.allow_null)
        t0 = time.perf_counter()
        if args.nbest:
            preds = predict_and_write_nbest(qa, all_examples, fcfg, dcfg, args)
        else:
            preds = predict(qa.model, qa.tokenizer, all_examples, fcfg, dcfg, args.batch_size, args.device,
                            progress=not args.quiet)
        elapsed = time.perf_counter() - t0
        answers = {qid: p.text for qid, p in preds.items()}
        print(f"{len(all_examples)} questions in {elapsed:.1f}s ({len(all_examples) / elapsed:.1f} questions/s)")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(answers, f, ensure_ascii=False, indent=0)
    metrics = score_datasets(answers, by_dataset, squad2)
    if not args.predictions:
        add_card_scores(metrics, args.model)
    if args.per_question:
        write_per_question(args.per_question, answers, by_dataset, squad2)
    if args.metrics:
        with open(args.metrics, "w") as f:
            json.dump(metrics, f, indent=2)
    print_table(metrics)
    return metrics


# --- SQuAD 2.0, n-best, per-question and the model card: separate from the MRQA path above

def unanswerable_questions(by_dataset, allow_null) -> set:
    """Datasets with unanswerable questions (SQuAD v2.0 files) to score by SQuAD 2.0's rules. Without
    --allow-null the model cannot say "no answer", so those questions are left out, with a notice."""
    squad2 = set()
    for name, exs in by_dataset.items():
        n = sum(1 for ex in exs if not ex.answers)
        if not n:
            continue
        if allow_null:
            squad2.add(name)
        else:
            by_dataset[name] = [ex for ex in exs if ex.answers]
            print(f"note: {name}: {n} unanswerable question(s) left out; pass --allow-null to score them by "
                  "SQuAD 2.0's rules (for a model trained to give the null answer)", file=sys.stderr)
    return squad2


def predict_and_write_nbest(qa, examples, fcfg, dcfg, args):
    """predict(), keeping the logits for run_qa's n-best lists, which are written to args.nbest."""
    features, starts, ends = forward_examples(qa.model, qa.tokenizer, examples, fcfg, args.batch_size, args.device,
                                              progress=not args.quiet)
    nbest = decode_nbest(examples, features, starts, ends, dcfg.n_best, dcfg.max_answer_len, dcfg.allow_null)
    write_atomic(args.nbest, lambda f: json.dump(nbest, f, ensure_ascii=False, indent=1))
    return decode(examples, features, starts, ends, dcfg.n_best, dcfg.max_answer_len, dcfg.allow_null)


def write_per_question(path, answers, by_dataset, squad2):
    def write(f):
        for name, exs in by_dataset.items():
            for ex in exs:
                pred = answers.get(ex.qid)
                em, f1 = example_scores(pred, ex.answers, name in squad2) if pred is not None else (0.0, 0.0)
                f.write(json.dumps({"qid": ex.qid, "dataset": name, "question": ex.question, "answers": ex.answers,
                                    "prediction": pred, "exact_match": em, "f1": f1}, ensure_ascii=False) + "\n")
    write_atomic(path, write)


def add_card_scores(metrics, model):
    """metrics["card"]: the model card's macro EM/F1 when `model` is a known checkpoint and the data is a
    whole official split (its datasets' question counts), so that the two numbers are comparable."""
    hub_id = ALIASES.get(model, model)
    if hub_id not in CARD_SCORES:
        return
    totals = sorted(r["total"] for r in metrics["datasets"].values())
    for split in ("dev", "test"):
        if totals == sorted(n for (s, _), (_, _, n) in SPLITS.items() if s == split):
            em, f1 = CARD_SCORES[hub_id][split]
            metrics["card"] = {"hub_id": hub_id, "split": split, "exact_match": em, "f1": f1}


def check_output_paths(*paths):
    for path in paths:
        if path is None:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path) or not os.path.isdir(parent):
            raise TinyQAError(f"{path}: cannot write there ({'a directory' if os.path.isdir(path) else 'no folder ' + parent})")


def write_atomic(path, write):
    """write(f) to a temporary file beside path, then rename: a failure never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise TinyQAError(f"{path}: cannot write it ({e.strerror})")


if __name__ == "__main__":
    with cli_errors():
        main()
