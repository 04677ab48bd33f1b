"""Beyond one process, on torch.distributed's own launcher: evaluate.py sharded over torchrun's processes
writes what one process writes, and training under `torchrun --max-restarts` survives a killed rank
(`--resume auto`), on one node or two simulated on this machine. Every group is 2 gloo processes on the CPU,
run with `python -m torch.distributed.run`, each under a timeout so that a hang fails the test."""
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, synth_args
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
    """A tiny random checkpoint and two MRQA files: 2,160 questions, a third of their contexts several windows
    long, and 120 more: two of evaluate.py's chunks, the second across both files."""
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


# --- training: --resume auto, in one process

def finetune_argv(synth, out, *extra):
    """A 1 x 32 model with dropout on (so the RNG states matter) on 40 questions, 56 windows: 8 steps of 16, a
    checkpoint every 2, and --resume auto."""
    return synth_args(synth, out, "--init-config", synth["dropout_cfg"], "--epochs", "2", "--batch-size", "16",
                      "--lr", "1e-3", "--limit", "40", "--save-every", "2", "--resume", "auto", *extra)


def weights(folder) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_resume_auto_starts_resumes_and_refuses_another_run(synth, tmp_path, capsys):
    """--resume auto in every situation a restarted group can find --out in, in one process: empty, an
    attempt's first steps (same settings: started over; other settings: refused), checkpoints (the newest
    complete one), a finished run without checkpoints (refused), and beside --overwrite (refused)."""
    from tinyqa import TinyQAError, cli
    from tinyqa.train import train
    a = tmp_path / "a"
    train(cli.finetune_args(finetune_argv(synth, a)))  # an empty --out: a fresh start
    steps = [json.loads(line)["step"] for line in (a / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 5
    # what an attempt lost after 1 step, before its first checkpoint, leaves: its settings, its log, a
    # checkpoint being written; a restart with the same command line starts over it
    b = tmp_path / "b"
    (b / "checkpoint-2.tmp").mkdir(parents=True)
    shutil.copy(a / "args.json", b / "args.json")
    (b / "log.jsonl").write_text((a / "log.jsonl").read_text().splitlines()[0] + "\n")
    train(cli.finetune_args(finetune_argv(synth, b)))
    assert weights(b) == weights(a) and (b / "log.jsonl").read_text().count("\n") == len(steps)
    assert not (b / "checkpoint-2.tmp").exists()
    # a restart after a checkpoint continues from the newest complete one (a later one being written is not)
    newest = max(int(p.name.split("-")[1]) for p in a.glob("checkpoint-*"))
    (a / f"checkpoint-{newest + 1}.tmp").mkdir()
    (a / "model.safetensors").unlink()
    capsys.readouterr()
    train(cli.finetune_args(finetune_argv(synth, a)))
    assert f"resuming at step {newest}" in capsys.readouterr().out
    assert weights(a) == weights(b)
    # another run's first steps, a finished run, and --overwrite are refused
    c = tmp_path / "c"
    c.mkdir()
    shutil.copy(a / "args.json", c / "args.json")
    with pytest.raises(TinyQAError, match=r"another run.*--lr 0\.002 \(that run has 0\.001\)"):
        train(cli.finetune_args(finetune_argv(synth, c, "--lr", "2e-3")))
    done = tmp_path / "done"
    train(cli.finetune_args(finetune_argv(synth, done, "--save-every", "0")))
    with pytest.raises(TinyQAError, match="holds a finished run"):
        train(cli.finetune_args(finetune_argv(synth, done, "--save-every", "0")))
    with pytest.raises(TinyQAError, match="--overwrite would delete it"):
        train(cli.finetune_args(finetune_argv(synth, a, "--overwrite")))


# --- training under torchrun: a lost rank, and two nodes

def train_cmd(synth, out):
    return [ROOT / "train_finetune.py", *finetune_argv(synth, out)]


@pytest.fixture(scope="module")
def unbroken(synth, tmp_path_factory):
    """The run every restarted or two-node group must end as: 2 processes on one node, nothing killed."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    run(torchrun(*train_cmd(synth, out)))
    return out


@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_and_the_run_ends_as_an_unbroken_one(synth, unbroken, tmp_path):
    """torchrun --max-restarts 2 with TINYQA_TEST_KILL (tinyqa/runs.py): rank 0 is killed after step 1 of the
    first attempt, before any checkpoint (the second attempt starts the run again over its log), and rank 1
    after step 3 of the second, past checkpoint-2 (the third continues from it). model.safetensors equals the
    unbroken run's byte for byte, and the log holds each step once."""
    out = tmp_path / "run"
    # c10d's rendezvous (a static one keeps one store across attempts) with a store of the workers' own: the
    # one torchrun shares with them keeps the last attempt's keys (pytorch#135712, docs/scaling.md)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *train_cmd(synth, out)]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**env(), "TINYQA_TEST_KILL": "1:0:0,3:1:1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming at step 2" in r.stdout, r.stdout[-2000:]
    assert r.stderr.count("exitcode: -9") == 2, r.stderr[-4000:]  # two attempts lost a rank to SIGKILL
    assert weights(out) == weights(unbroken)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))


@pytest.mark.slow
def test_two_nodes_give_the_weights_of_one(synth, unbroken, tmp_path):
    """Two torchrun agents of one process each (--nnodes 2) meeting through c10d's rendezvous on this machine,
    as two machines would: the weights of one node with 2 processes, byte for byte."""
    out, port = tmp_path / "run", free_port()
    agents = [subprocess.Popen([str(c) for c in [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
        *train_cmd(synth, out)]], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)]
    try:
        results = [a.communicate(timeout=TIMEOUT) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], [err[-3000:] for _, err in results]
    assert weights(out) == weights(unbroken)
