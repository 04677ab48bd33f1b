"""Expected calibration error before and after `python -m tinyqa calibrate`, in and out of domain.

    python benchmarks/real_squad.py --out real-squad-run             # first: the real-weights miniature
    python benchmarks/bench_calibration.py --run real-squad-run      # then: under a minute on 2 CPU cores

The model is the miniature's teacher (all-MiniLM-L6-v2 fine-tuned on the SQuAD dev articles that
real_squad.py trains on; --model picks another of its folders). Its held-out articles are split again, by
article and seeded: the calibration is FITTED on half of them (calibration.jsonl.gz) and reported on the
other half (in-domain.jsonl.gz: articles neither training nor fitting saw) and on an out-of-domain set:
the demo's synthetic people-and-facts questions (tinyqa/synthetic.py), written as a SQuAD v1.1 JSON file.
The checkpoint is copied first, so the run's own folder is left as it was.
"""
import argparse
import gzip
import json
import os
import random
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tinyqa.answerer import QuestionAnswerer  # noqa: E402
from tinyqa.calibrate import calibrate  # noqa: E402
from tinyqa.synthetic import make_dataset  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the --out folder of benchmarks/real_squad.py")
    p.add_argument("--model", default="teacher", help="which of the run's models to calibrate")
    p.add_argument("--out", default=None, help="folder for the files and the copy (default: RUN/calibration)")
    p.add_argument("--ood-contexts", type=int, default=200, help="synthetic contexts of the out-of-domain set")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the synthetic set")
    p.add_argument("--bins", type=int, default=10, help="equal-width confidence bins")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.run, args.model)):
        p.error(f"--run {args.run}: no {args.model}/ in it (run benchmarks/real_squad.py --out {args.run} first)")
    return args


def split_heldout(path, out, seed):
    """The held-out articles in two halves by article: (fit file, report file)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    header, rows = rows[0], rows[1:]
    titles = sorted({r["id"].rsplit("-", 1)[0] for r in rows})
    fit = set(random.Random(seed).sample(titles, len(titles) // 2))
    files = {}
    for name, keep in (("calibration", lambda t: t in fit), ("in-domain", lambda t: t not in fit)):
        files[name] = os.path.join(out, f"{name}.jsonl.gz")
        with gzip.open(files[name], "wt", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            for r in rows:
                if keep(r["id"].rsplit("-", 1)[0]):
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return files["calibration"], files["in-domain"]


def synthetic_squad(path, n_contexts, seed):
    """The demo's synthetic questions as a SQuAD v1.1 JSON file (one article per context)."""
    data = []
    for row in make_dataset(n_contexts, seed, split="ood"):
        qas = [{"id": q["qid"], "question": q["question"],
                "answers": [{"text": d["text"], "answer_start": d["char_spans"][0][0]} for d in q["detected_answers"]]}
               for q in row["qas"]]
        data.append({"title": row["id"], "paragraphs": [{"context": row["context"], "qas": qas}]})
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"version": "1.1", "data": data}, f, ensure_ascii=False)
    return path


def main(argv=None):
    args = get_args(argv)
    out = args.out or os.path.join(args.run, "calibration")
    os.makedirs(out, exist_ok=True)
    fit, in_domain = split_heldout(os.path.join(args.run, "heldout.jsonl.gz"), out, args.seed)
    ood = synthetic_squad(os.path.join(out, "out-of-domain.json"), args.ood_contexts, args.seed)
    model = os.path.join(out, args.model)
    shutil.copytree(os.path.join(args.run, args.model), model, dirs_exist_ok=True)
    qa = QuestionAnswerer.from_pretrained(model)
    result = calibrate(qa, model, [fit], [in_domain, ood], bins=args.bins, plot=os.path.join(out, "reliability.png"))
    print(json.dumps(result.fitted_on["ece"], indent=2))
    return result


if __name__ == "__main__":
    main()
