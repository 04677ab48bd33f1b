"""Beyond one process, on torch.distributed's own launcher: evaluate.py sharded over torchrun's processes
writes what one process writes, and training under `torchrun --max-restarts` survives a killed rank
(`--resume auto`), on one node or two simulated on this machine. Every group is 2 gloo processes on the CPU,
run with `python -m torch.distributed.run`, each under a timeout so that a hang fails the test."""
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys

import pytest
from conftest import ROOT
from hermetic import tiny_checkpoint

from tinyqa.distributed import balance
from tinyqa.synthetic import make_dataset, write_mrqa

# evaluate.py, loaded by path: a plain `import evaluate` could find Hugging Face's `evaluate` package
_spec = importlib.util.spec_from_file_location("tinyqa_evaluate_script", ROOT / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)

TIMEOUT = 300  # seconds for one command; a group that hangs fails its test instead of the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    """One thread a process (torchrun's own default, and the same for the one-process runs compared with
    it), and this checkout's tinyqa in every subprocess."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run(cmd, timeout=TIMEOUT, **kw):
    r = subprocess.run([str(c) for c in cmd], env=env(), capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def torchrun(*flags):
    """`torchrun --nproc-per-node 2 <flags>` on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
            *flags]


# --- the split: pure functions, the same on every rank

def test_balance_is_largest_first_onto_the_least_loaded_rank():
    assert balance([5, 3, 3, 2, 2], 2) == [0, 1, 1, 0, 1]  # the docstring's worked example
    assert balance([1, 1, 1], 3) == [0, 1, 2]  # ties: the lower rank first
    assert balance([], 4) == []
    costs = [len(w) for w in "a long list of words whose lengths are the costs to split over three ranks".split()]
    owner = balance(costs, 3)
    loads = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(3)]
    assert max(loads) - min(loads) <= max(costs) and owner == balance(costs, 3)


def test_shares_keep_contexts_whole_and_cover_the_chunk_once(tmp_path):
    from tinyqa.mrqa import read_mrqa
    write_mrqa(tmp_path / "dev.jsonl.gz", make_dataset(60, seed=4, long_fraction=0.3, split="dev"))
    examples = list(read_mrqa(tmp_path / "dev.jsonl.gz"))
    for world in (1, 2, 3, 8):
        shares = [evaluate.share(examples, world, rank) for rank in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(len(examples)))
        assert all(s == sorted(s) for s in shares)  # each in the chunk's order
        rank_of = {examples[i].context: r for r, s in enumerate(shares) for i in s}
        assert all(examples[i].context in rank_of and rank_of[examples[i].context] == r
                   for r, s in enumerate(shares) for i in s)  # no context on two ranks
    cost = [sum(len(examples[i].context) + len(examples[i].question) for i in s)
            for s in (evaluate.share(examples, 2, r) for r in range(2))]
    assert abs(cost[0] - cost[1]) <= max(len(ex.context) for ex in examples) * 4, cost


# --- evaluate.py under torchrun

@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """A tiny random checkpoint and two MRQA files: one of more than 2,000 questions (two of evaluate.py's
    chunks, a context cut between them), a third of its contexts several windows long; and a small one."""
    d = tmp_path_factory.mktemp("sharded-eval")
    tiny_checkpoint(d / "model")
    write_mrqa(d / "a.jsonl.gz", make_dataset(720, seed=5, long_fraction=0.3, long_people=(8, 12), split="dev"),
               dataset="SynthA", split="dev")
    write_mrqa(d / "b.jsonl.gz", make_dataset(40, seed=6, split="dev"), dataset="SynthB", split="dev")
    return d


def test_sharded_evaluation_writes_what_one_process_writes(eval_data, tmp_path):
    """--output, --metrics, --nbest and --per-question byte for byte, the table line for line but the timing,
    and each of the 2 processes ran about half of the windows."""
    d = eval_data
    args = ["--model", d / "model", "--data", d / "a.jsonl.gz", d / "b.jsonl.gz", "--max-seq-len", "128",
            "--doc-stride", "32", "--quiet"]
    outputs = {}
    for name, launch in (("one", [sys.executable]), ("two", torchrun())):
        out = tmp_path / name
        out.mkdir()
        r = run([*launch, ROOT / "evaluate.py", *args, "--output", out / "preds.json", "--metrics",
                 out / "metrics.json", "--nbest", out / "nbest.json", "--per-question", out / "rows.jsonl"])
        outputs[name] = (out, r)
    (one, r1), (two, r2) = outputs["one"], outputs["two"]
    n_questions = len((one / "rows.jsonl").read_text().splitlines())
    assert n_questions > evaluate.CHUNK_QUESTIONS
    for f in ("preds.json", "metrics.json", "nbest.json", "rows.jsonl"):
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    table = lambda out: [line for line in out.splitlines() if " questions in " not in line]  # noqa: E731
    assert table(r1.stdout) == table(r2.stdout) and len(table(r1.stdout)) == 5, (r1.stdout, r2.stdout)
    (split,) = [line for line in r2.stderr.splitlines() if line.startswith("2 processes")]
    work = [(int(q), int(w)) for _, q, w in re.findall(r"rank (\d+): (\d+) questions, (\d+) windows", split)]
    assert len(work) == 2, split
    assert sum(q for q, _ in work) == n_questions
    windows = [w for _, w in work]
    assert min(windows) >= 0.45 * sum(windows), split  # about half each
