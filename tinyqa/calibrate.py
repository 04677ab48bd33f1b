"""`python -m tinyqa calibrate`: fit a checkpoint's confidence map (and, for SQuAD 2.0-style data, its null
threshold) on labelled questions, write it beside the weights, and show how well it fits.

    python -m tinyqa calibrate --model runs/finetune --data dev.jsonl.gz --heldout other.jsonl.gz

The model answers every question as `read` ranks spans (by their score above their window's null score);
each question's top span gives that score and whether it is right (exact match); tinyqa/calibration.py
fits sigmoid((s - offset) / temperature) to those. On data with unanswerable questions, the null threshold
that maximises F1 is chosen for evaluate.py's decoder (run_qa's: null score minus the best span's).
calibration.json is written into the checkpoint, so `answer`, `read`, evaluate.py and `serve` use it.
Printed: the expected calibration error before (the uncalibrated map) and after, on the data and on
each --heldout set (never fitted on), and, with matplotlib installed (tinyqa's [plot] extra), a reliability
diagram as a PNG.
"""
import os
from dataclasses import replace

import numpy as np

from . import calibration as cal
from .data import read_files
from .decode import decode, rank_documents
from .errors import TinyQAError
from .files import atomic_write, chunks
from .infer import forward_examples
from .metrics import example_scores


def score_questions(qa, examples, fcfg, batch_size=64, device="cpu") -> dict:
    """Per question, as arrays in the examples' order (a chunk of questions at a time):
    score, em: the top span's score as `read` ranks it, and whether it is right (exact match, by SQuAD 2.0's
      rules for an unanswerable question: any span is wrong);
    null_diff, f1: run_qa's null score minus its best span's (evaluate.py's decoder), and that span's F1;
    has_answer: whether the question is answerable."""
    out = {k: [] for k in ("score", "em", "null_diff", "f1", "has_answer")}
    for chunk in chunks(examples, 2000):
        features, starts, ends = forward_examples(qa.model, qa.tokenizer, chunk, fcfg, batch_size, device)
        preds = decode(chunk, features, starts, ends, qa.dcfg.n_best, qa.dcfg.max_answer_len)
        windows, null = [[] for _ in chunk], {}
        for f, s, e in zip(features, starts, ends):
            windows[f.example_index].append((0, s, e, f.offsets, f.words))
            null[f.example_index] = min(null.get(f.example_index, np.inf), float(s[0] + e[0]))
        for i, ex in enumerate(chunk):
            top = rank_documents([ex.context], [0], windows[i], qa.calibration, 1, qa.dcfg.max_answer_len,
                                 qa.dcfg.n_best, align_to_words=qa.dcfg.align_to_words)
            out["score"].append(top[0].logit_score if top else -np.inf)
            out["em"].append(example_scores(top[0].text if top else "", ex.answers, squad2=not ex.answers)[0])
            out["null_diff"].append(null[i] - preds[ex.qid].score)
            out["f1"].append(example_scores(preds[ex.qid].text, ex.answers, squad2=not ex.answers)[1])
            out["has_answer"].append(bool(ex.answers))
    return {k: np.asarray(v) for k, v in out.items()}


def calibrate(qa, directory, data, heldout=(), fcfg=None, bins=10, plot=None, batch_size=64, device="cpu",
              log=print) -> cal.Calibration:
    """Fit on `data` (MRQA or SQuAD files), report on it and on `heldout`, write `directory`/calibration.json
    (and the diagram to `plot`). Returns the calibration written."""
    fcfg = fcfg or qa.fcfg
    read = lambda files, flag: [ex for _, _, exs in read_files(files, flag=flag) for ex in exs]  # noqa: E731
    sets = {"data": score_questions(qa, read(data, "--data"), fcfg, batch_size, device)}
    for path in heldout:
        sets[os.path.basename(path)] = score_questions(qa, read([path], "--heldout"), fcfg, batch_size, device)
    fitted = sets["data"]
    finite = np.isfinite(fitted["score"])  # a question whose windows hold no valid span has no score
    temperature, offset = cal.fit(fitted["score"][finite], fitted["em"][finite])
    null_threshold = None
    if not fitted["has_answer"].all():  # SQuAD 2.0-style data: choose where the null answer wins
        null_threshold, best_f1 = cal.best_null_threshold(fitted["null_diff"], fitted["f1"], fitted["has_answer"])
        log(f"null threshold {null_threshold:.4f}: F1 {best_f1:.2f} on the data")
    before, after = cal.Calibration(), cal.Calibration(temperature, offset, null_threshold)
    ece = {}
    for name, s in sets.items():
        ok = np.isfinite(s["score"])
        ece[name] = {"questions": int(ok.sum()), "accuracy": float(s["em"][ok].mean()),
                     "before": cal.expected_calibration_error(before.confidence(s["score"][ok]), s["em"][ok], bins),
                     "after": cal.expected_calibration_error(after.confidence(s["score"][ok]), s["em"][ok], bins)}
        log(f"{name}: {ece[name]['questions']} questions, top answer right {100 * ece[name]['accuracy']:.1f}%, "
            f"expected calibration error {ece[name]['before']:.4f} before, {ece[name]['after']:.4f} after")
    after = replace(after, fitted_on={"data": [os.path.basename(p) for p in data], "bins": bins, "ece": ece})
    cal.save(directory, after)
    log(f"wrote {os.path.join(directory, cal.FILE)}: temperature {temperature:.4f}, offset {offset:.4f}")
    if plot:
        draw(plot, sets, before, after, bins)
        log(f"wrote {plot}")
    return after


def draw(path, sets, before, after, bins):
    """The reliability diagram: per set, accuracy against mean confidence in each bin, before and after
    (the diagonal is perfect calibration), written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], sets.items()):
        ok = np.isfinite(s["score"])
        for label, c, style in (("before", before, "o--"), ("after", after, "s-")):
            _, accuracy, confidence, _ = cal.reliability(c.confidence(s["score"][ok]), s["em"][ok], bins)
            ece = cal.expected_calibration_error(c.confidence(s["score"][ok]), s["em"][ok], bins)
            ax.plot(confidence, accuracy, style, label=f"{label} (ECE {ece:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        ax.set(title=f"{name} ({int(ok.sum())} questions)", xlabel="confidence", ylabel="accuracy (exact match)",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def check_plot(path):
    """--plot needs matplotlib (tinyqa's [plot] extra): refused before any work when it is missing."""
    import importlib.util
    if path and importlib.util.find_spec("matplotlib") is None:
        raise TinyQAError("--plot needs matplotlib: pip install matplotlib (tinyqa's [plot] extra), or drop --plot")
