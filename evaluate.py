"""Evaluate an extractive QA model on MRQA files with the official EM/F1.

    python evaluate.py --split dev                      # in-domain dev (the card's "Eval"), downloaded
    python evaluate.py --model electra-small-mrqa --split dev   # any row of the card's family (table below)
    python evaluate.py --split test                     # out-of-domain dev (the card's "Test")
    python evaluate.py --model DIR --data a.jsonl.gz b.jsonl.gz --output preds.json --metrics metrics.json
    python evaluate.py --predictions preds.json --data SQuAD-dev.jsonl.gz   # score a file, no model
    python evaluate.py --model DIR --data dev-v2.0.json --handle-impossible-answer --nbest nbest.json --per-question q.jsonl
    torchrun --nproc-per-node 4 evaluate.py --model DIR --split dev --output preds.json   # 4 processes, same files

Prints a table per dataset plus the macro average over datasets (MRQA's headline) and the micro average;
for a known checkpoint evaluated on a whole official split, the model card's numbers beneath.
--data also takes SQuAD v1.1 / v2.0 JSON files. A v2.0 file's unanswerable questions are scored by SQuAD
2.0's rules (an empty prediction is right) with --handle-impossible-answer, and left out, with a notice, without it.

Under torchrun (`--nproc-per-node N`, `--nnodes`) every process reads the same chunks of questions and runs
its share of each: whole contexts, spread over the processes by length (`share`); rank 0 gathers each chunk's
predictions and n-best lists and writes what one process writes. Files and table are byte for byte those of
one process wherever a window's logits do not depend on the other windows of its batch: the CPU's forward
on real tokens (every family but DeBERTa). Padded batches (GPUs, DeBERTa) can differ from one process's in
the logits' last bits, so in the n-best file's numbers (docs/scaling.md).
"""
import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from tqdm import tqdm

from tinyqa import distributed
from tinyqa.catalog import ALIASES, CARD_SCORES, SPLITS, card_table, quiet_downloads, resolve_dir, split_files
from tinyqa.checks import check_device, check_distinct_outputs, check_featurizer, check_input_files, check_output_file
from tinyqa.cli import (DTYPES, HelpFormatter, add_decoder_args, add_featurizer_args, add_inference_model_args,
                        finite_float, positive_int)
from tinyqa.data import stream_files
from tinyqa.decode import DecodeConfig, decode, decode_nbest
from tinyqa.errors import TinyQAError, cli_errors
from tinyqa.examples import ReadReport
from tinyqa.features import pair_layout
from tinyqa.files import atomic_write, chunks, write_json
from tinyqa.infer import featurizer_config_of, forward_examples
from tinyqa.metrics import example_scores, score_datasets


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False,
                                epilog="The model card's family: --model takes the alias (macro EM/F1 as the card "
                                       "reports them; eval = --split dev, test = --split test):\n" + card_table())
    g = p.add_argument_group("data")
    g.add_argument("--split", choices=["dev", "test"], default=None,
                   help="official MRQA split to download and evaluate: dev = the six in-domain dev sets, "
                        "test = the six out-of-domain dev sets (default: dev, unless --data is given); from the "
                        "release's URLs, or the copy that TINYQA_MRQA_MIRROR=URL or TINYQA_MRQA_SPLITS=table.json "
                        "names (tinyqa/catalog.py)")
    g.add_argument("--data", nargs="+", metavar="FILE",
                   help="local MRQA .jsonl(.gz) or SQuAD .json files instead of --split")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip malformed lines (counted and reported) instead of stopping at the first one")
    g.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N questions of each file")
    g = add_inference_model_args(p, device="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--predictions", metavar="FILE",
                   help="score this existing {qid: answer} JSON file instead of running a model")
    g.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    add_featurizer_args(p, card_defaults=False)
    g = p.add_argument_group("decoder (run_qa's n-best)")
    g.add_argument("--n-best", type=positive_int, default=20, help="top start and end logits combined per window")
    add_decoder_args(g)
    g.add_argument("--null-threshold", type=finite_float, default=None,
                   help="with --handle-impossible-answer, the null answer wins when its score beats the best span's "
                        "by more than this (run_qa's null_score_diff_threshold; default: the checkpoint's "
                        "calibration.json, which `python -m tinyqa calibrate` fits, else 0)")
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
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.split and args.data:
        p.error("give --split or --data, not both")
    return args


def check_args(args):
    """Everything that can be refused before a model is loaded or a question read: inputs readable,
    outputs writable (and not overwriting an input), the device, the window settings."""
    check_input_files(args.data, "--data")
    check_input_files([args.predictions] if args.predictions else [], "--predictions")
    outputs = {"--output": args.output, "--metrics": args.metrics, "--nbest": args.nbest,
               "--per-question": args.per_question}
    for flag, path in outputs.items():
        check_output_file(path, flag)
    check_distinct_outputs(outputs,
                           inputs=(args.data or []) + ([args.predictions] if args.predictions else []))
    if args.predictions:
        return None
    check_device(args.device, DTYPES[args.dtype], args.quantize)
    args.model_name = args.model  # as given: an alias or hub id finds the card's scores
    args.model = resolve_dir(args.model, flag="--model")  # a local folder now (downloaded if a hub id)
    fcfg = featurizer_config_of(args.model, max_seq_len=args.max_seq_len, doc_stride=args.doc_stride,
                                max_question_len=args.max_question_len)
    check_featurizer(fcfg.max_seq_len, fcfg.doc_stride, fcfg.max_question_len)
    return fcfg


# Questions featurized, run and decoded together: evaluate.py holds one chunk's windows and logits at a time,
# plus, for scoring, each question's qid, text and gold answers (never the contexts), whatever the file's size.
CHUNK_QUESTIONS = 2000


def stream_examples(args, files, report):
    """(dataset name, Example) of every question to score, in file order, read lazily. Names come from each
    file's header, else its name (two files naming the same dataset stay apart). A SQuAD 2.0 question with
    no answer is only kept with --handle-impossible-answer; the others are counted in args.left_out, and a
    file that keeps no question at all is an error (it would enter the averages as nothing)."""
    names, kept = {}, {}
    for i, ex in stream_files(files, args.limit, args.skip_bad, report, flag="--data"):
        if i not in names:
            _check_kept(files, names, kept, args)
            unique, k = ex.dataset, 2
            while unique in names.values():
                unique, k = f"{ex.dataset}#{k}", k + 1
            names[i], kept[i] = unique, 0
        if not ex.answers and not args.handle_impossible_answer:
            args.left_out[names[i]] = args.left_out.get(names[i], 0) + 1
            continue
        kept[i] += 1
        yield names[i], ex
    _check_kept(files, names, kept, args)


def _check_kept(files, names, kept, args):
    for i, n in kept.items():
        if n == 0:
            raise TinyQAError(f"--data {files[i]}: all {args.left_out[names[i]]} questions are unanswerable (SQuAD "
                              "2.0) and left out without --handle-impossible-answer: pass it to score them by SQuAD "
                              "2.0's rules (for a model trained to give the null answer)")


def read_predictions(path):
    try:
        with open(path, encoding="utf-8") as f:
            preds = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyQAError(f"--predictions {path}: cannot read predictions JSON ({e})")
    if not isinstance(preds, dict) or not all(isinstance(v, str) for v in preds.values()):
        raise TinyQAError(f"--predictions {path}: must be a JSON object {{qid: answer string}}")
    return preds


def report_coverage(answers, examples, path):
    """Questions without a prediction score 0, as in the official script: say so loudly, naming a few."""
    missing = [ex.qid for ex in examples if ex.qid not in answers]
    if missing:
        print(f"warning: {len(missing)} of {len(examples)} questions have no prediction in {path} and score 0: "
              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    unknown = len(set(answers) - {ex.qid for ex in examples})
    if unknown:
        print(f"note: {unknown} predicted qids are not in the data and were ignored", file=sys.stderr)


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
    if args.quiet:
        quiet_downloads()
    fcfg = check_args(args)
    d = distributed.init(args.device)  # under torchrun: this process's rank, and its own GPU
    if args.threads:
        torch.set_num_threads(args.threads)
    qa = None
    if not args.predictions:  # the model first: a wrong --model fails before any data is downloaded or read
        from tinyqa.answerer import QuestionAnswerer
        qa = QuestionAnswerer.from_pretrained(args.model, device=d.device, dtype=DTYPES[args.dtype],
                                              quantize=args.quantize)
        # the exact room for context, now that the tokenizer says how many special tokens a window has
        check_featurizer(fcfg.max_seq_len, fcfg.doc_stride, fcfg.max_question_len, pair_layout(qa.tokenizer).n_special)
    elif not d.master:  # scoring a predictions file runs no model: nothing to share
        distributed.finish(d)
        return None
    files = args.data or split_files(args.split or "dev", progress=not args.quiet and d.master)
    report, args.left_out = ReadReport(), {}
    null_threshold = args.null_threshold if args.null_threshold is not None else \
        (qa.calibration.null_threshold if qa is not None and qa.calibration.null_threshold is not None else 0.0)
    dcfg = DecodeConfig(args.n_best, args.max_answer_len, args.handle_impossible_answer, null_threshold=null_threshold)
    t0 = time.perf_counter()
    by_dataset, answers = predict_all(args, files, report, qa, fcfg, dcfg, d)
    if not d.master:  # rank 0 scores and writes
        distributed.finish(d)
        return None
    report.print(lambda line: print(line, file=sys.stderr))
    for name, n in args.left_out.items():
        print(f"note: {name}: {n} unanswerable question(s) left out; pass --handle-impossible-answer to score them by "
              "SQuAD 2.0's rules (for a model trained to give the null answer)", file=sys.stderr)
    # datasets with unanswerable questions (SQuAD v2.0 files) are scored by SQuAD 2.0's rules
    squad2 = {name for name, exs in by_dataset.items() if any(not ex.answers for ex in exs)}
    all_examples = [ex for exs in by_dataset.values() for ex in exs]
    if args.predictions:
        answers = read_predictions(args.predictions)
        report_coverage(answers, all_examples, args.predictions)
    else:
        elapsed = time.perf_counter() - t0
        print(f"{len(all_examples)} questions in {elapsed:.1f}s ({len(all_examples) / elapsed:.1f} questions/s)")
    if args.output:
        write_json(args.output, answers, ensure_ascii=False, indent=0)
    metrics = score_datasets(answers, by_dataset, squad2)
    if not args.predictions:
        add_card_scores(metrics, args.model_name)
    if args.per_question:
        write_per_question(args.per_question, answers, by_dataset, squad2)
    if args.metrics:
        write_json(args.metrics, metrics, indent=2)
    print_table(metrics)
    distributed.finish(d)
    return metrics


def predict_all(args, files, report, qa, fcfg, dcfg, d):
    """Every question read a chunk at a time and, with a model, predicted: (by_dataset, answers), that is
    {dataset name: [Example without its context]} and {qid: predicted answer}, on rank 0 ({} and {} on the
    other ranks, which only run their shares). The n-best lists are written as they come."""
    by_dataset, answers, work = {}, {}, Work()
    with (nbest_writer(args.nbest) if args.nbest and qa and d.master else nullcontext()) as nbest, \
            tqdm(desc="evaluate", unit=" questions", disable=args.quiet or qa is None or not d.master) as bar:
        for chunk in chunks(stream_examples(args, files, report), CHUNK_QUESTIONS):
            if d.master:
                for name, ex in chunk:
                    by_dataset.setdefault(name, []).append(replace(ex, context=""))
            if qa is not None:
                answers.update(predict_chunk(qa, [ex for _, ex in chunk], fcfg, dcfg, args, nbest, d, work))
                bar.update(len(chunk))
    if qa is not None and d.world > 1:
        work.report(d)
    return by_dataset, answers


def predict_chunk(qa, examples, fcfg, dcfg, args, nbest, d, work=None) -> dict:
    """{qid: answer} for one chunk of examples (run_qa's n-best decoder), its n-best lists written to nbest.
    Under torchrun each process runs its share (`share`) and rank 0 gathers the predictions and n-best lists
    and puts them in the chunk's order, the order one process gives them; the other ranks return {}."""
    mine = [examples[i] for i in share(examples, d.world, d.rank)]
    t = time.perf_counter()
    preds, lists = {}, {}
    if mine:
        features, starts, ends = forward_examples(qa.model, qa.tokenizer, mine, fcfg, args.batch_size, d.device)
        if args.nbest:
            lists = decode_nbest(mine, features, starts, ends, dcfg.n_best, dcfg.max_answer_len,
                                 dcfg.handle_impossible_answer)
        preds = {qid: p.text for qid, p in decode(mine, features, starts, ends, dcfg.n_best, dcfg.max_answer_len,
                                                  dcfg.handle_impossible_answer, dcfg.null_threshold).items()}
        if work is not None:
            work.add(len(mine), len(features), time.perf_counter() - t)
    parts = distributed.gather_to_master(d, (preds, lists))
    if parts is None:
        return {}
    for p, nb in parts[1:]:
        preds.update(p)
        lists.update(nb)
    if nbest is not None:
        nbest.write({ex.qid: lists[ex.qid] for ex in examples})
    return {ex.qid: preds[ex.qid] for ex in examples}


def share(examples, world, rank) -> list:
    """The indices of the chunk's examples that process `rank` of `world` runs, in the chunk's order. Whole
    contexts: the questions of one context stay together (featurized together, the context tokenized once),
    and the contexts are spread over the processes by their cost, its characters times its questions (the
    tokens their windows hold), with distributed.balance: a pure function of the chunk, so each process
    computes its own share and none is sent."""
    if world == 1:
        return list(range(len(examples)))
    groups = {}  # context text -> indices of its questions, in order of first appearance
    for i, ex in enumerate(examples):
        groups.setdefault(ex.context, []).append(i)
    groups = list(groups.values())
    costs = [sum(len(examples[i].context) + len(examples[i].question) for i in g) for g in groups]
    owner = distributed.balance(costs, world)
    return sorted(i for g, r in zip(groups, owner) if r == rank for i in g)


class Work:
    """What this process ran (questions, windows, seconds in featurizing, the model and the decoder), reported
    per process under torchrun on stderr, so that the split can be seen to be even."""

    def __init__(self):
        self.questions = self.windows = 0
        self.seconds = 0.0

    def add(self, questions, windows, seconds):
        self.questions, self.windows, self.seconds = self.questions + questions, self.windows + windows, \
            self.seconds + seconds

    def report(self, d):
        rows = distributed.gather_to_master(d, (self.questions, self.windows, self.seconds))
        if rows is not None:
            print(f"{d.world} processes, each whole contexts balanced by length: "
                  + "; ".join(f"rank {r}: {q} questions, {w} windows, {s:.1f}s" for r, (q, w, s) in enumerate(rows)),
                  file=sys.stderr)


# --- SQuAD 2.0, n-best, per-question and the model card: separate from the MRQA path above

class nbest_writer:
    """run_qa's nbest_predictions.json written a chunk at a time, as one JSON object (one qid per line),
    under a temporary name renamed into place at the end."""

    def __init__(self, path):
        self.cm, self.first = atomic_write(path), True

    def __enter__(self):
        self.f = self.cm.__enter__()
        self.f.write("{")
        return self

    def write(self, nbest: dict):
        for qid, cands in nbest.items():
            self.f.write(("\n" if self.first else ",\n") + json.dumps(qid, ensure_ascii=False) + ": "
                         + json.dumps(cands, ensure_ascii=False))
            self.first = False

    def __exit__(self, *exc):
        if exc[0] is None:
            self.f.write("\n}\n")
        return self.cm.__exit__(*exc)


def write_per_question(path, answers, by_dataset, squad2):
    with atomic_write(path) as f:
        for name, exs in by_dataset.items():
            for ex in exs:
                pred = answers.get(ex.qid)
                em, f1 = example_scores(pred, ex.answers, name in squad2) if pred is not None else (0.0, 0.0)
                f.write(json.dumps({"qid": ex.qid, "dataset": name, "question": ex.question, "answers": ex.answers,
                                    "prediction": pred, "exact_match": em, "f1": f1}, ensure_ascii=False) + "\n")


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


if __name__ == "__main__":
    with cli_errors():
        main()
