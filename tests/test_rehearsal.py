"""The README's first commands, rehearsed end to end as a user with a network first runs them.

`python evaluate.py --split dev`, `python train_distill.py --teacher roberta-large-mrqa`, the lineage
(`--stage intermediate`, `--student runs/step1`, `train_finetune.py --model runs/distill`) run as
subprocesses, from empty caches, against a Hugging Face Hub and an MRQA mirror on 127.0.0.1
(tests/hubserver.py) that hold tiny random checkpoints under the card's hub ids and tiny split files
registered through TINYQA_MRQA_SPLITS. The aliases resolve through huggingface_hub exactly as online.
Checked: everything is downloaded once, verified and cached, and a second run with HF_HUB_OFFLINE=1 sends
no request; a download cut halfway resumes with a Range request, one stopped by Ctrl-C or a kill resumes
(ours) or restarts (huggingface_hub's) on the next run and never leaves a file that passes for complete;
a wrong MD5 is refused; a push to a repo mid-download does not mix two commits; the Hub answering 404,
401 or 500 gives one line that says what to do.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from hubserver import Files, Hub
from safetensors.torch import load_file

from tinyqa import EncoderConfig, EncoderForQA, save_pretrained
from tinyqa.catalog import ALIASES
from tinyqa.synthetic import make_dataset, train_tokenizer, write_mrqa

CARD_REPOS = {  # hub id -> (layers, weights file, tokenizer files, QA head?) of the tiny stand-in
    ALIASES["roberta-large-mrqa"]: (2, "model.safetensors", "tokenizer.json", True),  # the card's teacher
    ALIASES["tinyroberta-squad2-step1"]: (1, "model.safetensors", "tokenizer.json", True),  # its student
    ALIASES["tinyroberta-mrqa"]: (1, "model.safetensors", "tokenizer.json", True),  # evaluate.py's default
    ALIASES["roberta-base-squad2"]: (2, "model.safetensors", "vocab.json merges.txt", True),  # --stage intermediate
    ALIASES["tinyroberta-6l-768d"]: (1, "pytorch_model.bin", "tokenizer.json", False),  # ... teaches this base LM
}
SPLIT_FILES = {"train": ("SQuAD", "NewsQA"), "dev": ("SQuAD", "HotpotQA")}


def repo_files(tok, seed, layers, weights, tokenizer, qa_head) -> dict:
    """A tiny random RoBERTa (32 wide, RoBERTa's 514 positions, so the card's 384-token windows fit) as its
    hub repo holds it: file name -> bytes. A base LM has no QA head, and an MLM head that loading drops."""
    torch.manual_seed(seed)
    model = EncoderForQA(EncoderConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=layers,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=514))
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d, tokenizer=tok)  # config.json, model.safetensors, tokenizer(_config).json
        tok.model.save(d)  # vocab.json + merges.txt
        if weights == "pytorch_model.bin":
            state = load_file(os.path.join(d, "model.safetensors"))
            if not qa_head:
                state = {k: v for k, v in state.items() if not k.startswith("qa_outputs.")}
                state["lm_head.bias"] = torch.zeros(tok.get_vocab_size())
            torch.save(state, os.path.join(d, weights))
        names = ["config.json", weights, *tokenizer.split()]
        names += ["tokenizer_config.json"] if tokenizer == "tokenizer.json" else []
        return {name: Path(d, name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The bytes the servers hold: the card's repos on one byte-level BPE, and MRQA split files."""
    d = tmp_path_factory.mktemp("world")
    rows = make_dataset(60, seed=5)
    tok = train_tokenizer([r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]], 600)
    repos = {repo: repo_files(tok, seed, *spec) for seed, (repo, spec) in enumerate(CARD_REPOS.items())}
    splits = {}
    for seed, (split, name) in enumerate((s, n) for s, names in SPLIT_FILES.items() for n in names):
        path = write_mrqa(d / f"{split}-{name}.jsonl.gz", make_dataset(10, seed=100 + seed, split=split),
                          dataset=name, split=split)
        splits[split, name] = path.read_bytes()
    return {"repos": repos, "splits": splits}


@pytest.fixture
def user(world, tmp_path):
    """A user's machine on first contact: empty caches, and the Hub and the mirror serving the world."""
    files = Files()
    hub = Hub(files)
    for repo, repo_bytes in world["repos"].items():
        hub.push(repo, repo_bytes)
    table = {}
    for (split, name), data in world["splits"].items():
        url = files.add(f"/mrqa/release/v2/{split}/{name}.jsonl.gz", data)
        table.setdefault(split, {})[name] = {"url": url, "md5": hashlib.md5(data).hexdigest()}
    (tmp_path / "splits.json").write_text(json.dumps(table))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TINYQA_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), TINYQA_CACHE=str(tmp_path / "tinyqa"),
               TINYQA_MRQA_SPLITS=str(tmp_path / "splits.json"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    (tmp_path / "work").mkdir()
    yield User(hub, files, env, tmp_path)
    for event in files.stall.values():
        event.set()
    hub.close()
    files.close()


class User:
    def __init__(self, hub, files, env, root):
        self.hub, self.files, self.env, self.root = hub, files, env, root
        self.cwd, self.mrqa = root / "work", root / "tinyqa" / "mrqa"

    def command(self, line, **env):
        """`python evaluate.py --split dev` as argv: the checkout's script (its folder comes first on sys.path,
        so the checkout's tinyqa is the one imported), run from the user's working folder."""
        script, *args = line.split()[1:]
        return [sys.executable, str(ROOT / script), *args], dict(self.env, **env)

    def run(self, line, **env):
        argv, env = self.command(line, **env)
        return subprocess.run(argv, cwd=self.cwd, env=env, capture_output=True, text=True, timeout=300)

    def start(self, line, **env):
        argv, env = self.command(line, **env)
        return subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def requests(self):
        return self.hub.requests  # the Hub's and the mirror's, in order

    def snapshot(self, repo):
        """The HF cache's folder of repo at what refs/main says."""
        folder = self.root / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
        return folder / "snapshots" / (folder / "refs" / "main").read_text()

    def wait_for(self, what, done, timeout=60):
        t0 = time.time()
        while not done():
            assert time.time() - t0 < timeout, f"still waiting for {what}: {self.requests()}"
            time.sleep(0.05)


def ok(p):
    """Exit 0 and no traceback (progress bars and notices on stderr are fine)."""
    assert p.returncode == 0 and "Traceback" not in p.stderr, \
        f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def one_line_error(p, *says):
    """Exit 2, no traceback, and one `error:` line, the last, saying each of `says`."""
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(errors) == 1, f"exit {p.returncode}\n{p.stderr}"
    assert p.stderr.rstrip().endswith(errors[0]), p.stderr
    for s in says:
        assert s in errors[0], errors[0]
    return errors[0]


def lfs_path(world, repo, name="model.safetensors"):
    return f"/lfs/{hashlib.sha256(world['repos'][repo][name]).hexdigest()}"


def split_path(split, name):
    return f"/mrqa/release/v2/{split}/{name}.jsonl.gz"


def fetched_once(user):
    """Every request was one the servers know (nothing fell through to an unknown path), and no file was
    fetched twice. Returns the paths fetched."""
    unknown = [r for r in user.requests() if r[3] == 404 and "/resolve/" not in r[1]]
    assert not unknown, f"asked for what tests/hubserver.py does not serve (a new huggingface_hub?): {unknown}"
    gets = [r[1] for r in user.requests() if r[0] == "GET" and r[1] != "/api/agent-harnesses"]
    assert len(gets) == len(set(gets)), sorted(g for g in gets if gets.count(g) > 1)
    return gets


def assert_cached(user, world, split, repo):
    """The split's files verified in TINYQA_CACHE (and nothing half-written there), the repo at its commit."""
    for (s, name), data in world["splits"].items():
        if s == split:
            assert (user.mrqa / s / f"{name}.jsonl.gz").read_bytes() == data
    assert not list(user.mrqa.rglob("*.part"))
    snap = user.snapshot(repo)
    assert snap.name == user.hub.main[repo]
    for name, data in world["repos"][repo].items():
        if name != "pytorch_model.bin" or "model.safetensors" not in world["repos"][repo]:
            assert (snap / name).read_bytes() == data, name


# --- the first run, then the same offline

def test_evaluate_split_dev_first_run_then_offline(user, world):
    """`python evaluate.py --split dev` downloads the card's model and the dev split once, verified, with
    progress bars; a second run only asks the Hub whether the model changed, and an offline one sends
    nothing; all print the same table."""
    first = ok(user.run("python evaluate.py --split dev"))
    assert "SQuAD.jsonl.gz: 100%" in first.stderr and "HotpotQA.jsonl.gz: 100%" in first.stderr  # tinyqa's bars
    assert "macro average" in first.stdout and "HotpotQA" in first.stdout
    assert_cached(user, world, "dev", "VMware/tinyroberta-mrqa")
    gets = fetched_once(user)
    assert split_path("dev", "SQuAD") in gets and lfs_path(world, "VMware/tinyroberta-mrqa") in gets

    table = lambda out: out[out.index("dataset"):]
    n = len(user.requests())
    second = ok(user.run("python evaluate.py --split dev"))  # online: huggingface_hub only checks for updates
    assert not [r for r in user.requests()[n:] if r[0] == "GET" and r[1] != "/api/agent-harnesses"]
    assert table(second.stdout) == table(first.stdout)
    n = len(user.requests())
    offline = ok(user.run("python evaluate.py --split dev", HF_HUB_OFFLINE="1"))
    assert len(user.requests()) == n, user.requests()[n:]
    assert table(offline.stdout) == table(first.stdout)


ONE = " --epochs 1"  # the one flag the training commands get beyond the README's, to stay fast
CARD = ["python train_distill.py --teacher roberta-large-mrqa --out runs/distill",
        "python train_finetune.py --model runs/distill --out runs/finetune",
        "python evaluate.py --model runs/finetune --split dev"]
LINEAGE = ["python train_distill.py --stage intermediate --out runs/step1",
           "python train_distill.py --teacher roberta-large-mrqa --student runs/step1 --out runs/distill"]


def test_the_rehearsed_commands_are_the_readmes():
    """What the rehearsal runs is what the README tells a user to run, line for line."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = {line.split("  #")[0].strip() for line in readme.splitlines()}
    for command in ["python evaluate.py --split dev", *CARD, *LINEAGE]:
        assert command in lines, command


def first_runs_then_offline(user, lines):
    """The command lines in turn from empty caches, then the first, the one that names hub ids, again with
    HF_HUB_OFFLINE=1 (and --overwrite: its run exists now): that run sends no request."""
    for line in lines:
        ok(user.run(line))
    fetched_once(user)
    n = len(user.requests())
    ok(user.run(lines[0] + " --overwrite", HF_HUB_OFFLINE="1"))
    assert len(user.requests()) == n, user.requests()[n:]


def test_card_distillation_first_run_then_offline(user, world):
    """The README's reproduction of the card: the teacher and the student from the hub ids of the card's
    defaults, the MRQA train split, then fine-tuning and evaluating the result on the dev split."""
    first_runs_then_offline(user, [line + ONE if "train_" in line else line for line in CARD])
    assert_cached(user, world, "train", "VMware/roberta-large-mrqa")
    assert_cached(user, world, "dev", "deepset/tinyroberta-squad2-step1")
    args = json.loads((user.cwd / "runs" / "distill" / "args.json").read_text())
    assert (args["teacher"], args["student"]) == ("roberta-large-mrqa", "tinyroberta-squad2-step1")


def test_lineage_first_run_then_offline(user, world):
    """The README's lineage from its first stage's defaults: deepset/roberta-base-squad2 (vocab.json +
    merges.txt, no tokenizer.json) teaching deepset/tinyroberta-6l-768d (a base LM in pytorch_model.bin)."""
    first_runs_then_offline(user, [line + ONE for line in LINEAGE])
    assert_cached(user, world, "train", "deepset/roberta-base-squad2")
    assert_cached(user, world, "train", "deepset/tinyroberta-6l-768d")
    assert not (user.snapshot("deepset/roberta-base-squad2") / "tokenizer.json").exists()
    args = json.loads((user.cwd / "runs" / "step1" / "args.json").read_text())
    assert (args["teacher"], args["student"]) == ("roberta-base-squad2", "tinyroberta-6l-768d")


# --- downloads cut, interrupted, killed, wrong

def test_download_cut_halfway_resumes(user, world):
    """The connection drops halfway through the model and through a split file: tinyqa's downloader asks
    for the rest with a Range request; huggingface_hub, which keeps bytes in 10 MB chunks, starts this small
    file over. Either way the cached bytes are whole. --quiet shows no bar, huggingface_hub's neither
    (which TQDM_POSITION=-1 shows, as a terminal would, without --quiet)."""
    model, split = lfs_path(world, "VMware/tinyroberta-mrqa"), split_path("dev", "SQuAD")
    user.files.cut.update({model, split})
    p = ok(user.run("python evaluate.py --split dev --quiet", TQDM_POSITION="-1"))
    assert "%|" not in p.stderr, p.stderr
    half = len(world["splits"]["dev", "SQuAD"]) // 2
    assert [r[2:] for r in user.files.requests if r[1] == split] == [(None, 200), (f"bytes={half}-", 206)]
    _, (resume, status) = [r[2:] for r in user.files.requests if r[1] == model]
    assert (resume, status) == (None, 200) or (resume.startswith("bytes=") and status == 206)  # over, or the rest
    assert_cached(user, world, "dev", "VMware/tinyroberta-mrqa")


def test_ctrl_c_mid_split_download_then_resume(user, world):
    """Ctrl-C while a split file downloads: exit 130, no file that passes for complete, the bytes so far
    kept in .part; the next run asks only for the rest."""
    path, data = split_path("dev", "HotpotQA"), world["splits"]["dev", "HotpotQA"]
    dest = user.mrqa / "dev" / "HotpotQA.jsonl.gz"
    part = dest.parent / (dest.name + ".part")
    user.files.stall[path] = release = threading.Event()
    p = user.start("python evaluate.py --split dev --quiet")
    user.wait_for("the first half in .part", lambda: part.exists() and part.stat().st_size == len(data) // 2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    release.set()
    assert p.returncode == 130 and err.strip().endswith("interrupted") and "Traceback" not in err, err
    kept = part.stat().st_size
    assert not dest.exists() and kept == len(data) // 2
    ok(user.run("python evaluate.py --split dev --quiet"))
    assert [(r[2], r[3]) for r in user.files.requests if r[1] == path] == [(None, 200), (f"bytes={kept}-", 206)]
    assert_cached(user, world, "dev", "VMware/tinyroberta-mrqa")


def test_killed_mid_model_download_then_restart(user, world):
    """A run killed (SIGKILL) while huggingface_hub downloads the model: nothing in the HF cache passes for
    the model, and the next run downloads it whole."""
    path = lfs_path(world, "VMware/tinyroberta-mrqa")
    user.files.stall[path] = release = threading.Event()
    p = user.start("python evaluate.py --split dev --quiet")
    user.wait_for(f"GET {path}", lambda: any(r[:2] == ("GET", path) for r in user.requests()))
    p.kill()  # half of the model sent, the rest held back: it dies mid-download
    p.communicate(timeout=60)
    release.set()
    repo = user.root / "hf" / "hub" / "models--VMware--tinyroberta-mrqa"
    assert path.rsplit("/", 1)[1] not in [b.name for b in (repo / "blobs").iterdir()]  # only *.incomplete
    assert not list((repo / "snapshots").rglob("model.safetensors"))
    ok(user.run("python evaluate.py --split dev --quiet"))
    assert_cached(user, world, "dev", "VMware/tinyroberta-mrqa")


def test_wrong_md5_is_refused(user, world, tmp_path):
    """A mirror whose file is not the one the table's MD5 names: refused, one line, nothing kept."""
    data = world["splits"]["dev", "SQuAD"]
    table = json.loads((tmp_path / "splits.json").read_text())
    table["dev"]["SQuAD"]["url"] = user.files.add("/damaged/SQuAD.jsonl.gz", data[:-16] + bytes(16))
    (tmp_path / "damaged.json").write_text(json.dumps(table))
    p = user.run("python evaluate.py --split dev --quiet", TINYQA_MRQA_SPLITS=str(tmp_path / "damaged.json"))
    one_line_error(p, "/damaged/SQuAD.jsonl.gz", "MD5", hashlib.md5(data).hexdigest(), "run again")
    assert not (user.mrqa / "dev" / "SQuAD.jsonl.gz").exists() and not list(user.mrqa.rglob("*.part"))


def test_push_mid_download_keeps_one_commit(user, world):
    """The repo gets a new commit right after config.json was fetched: every file still comes from the
    first commit, in one snapshot folder, and the offline run finds them there."""
    repo = "VMware/tinyroberta-mrqa"
    first = user.hub.main[repo]
    changed = dict(world["repos"][repo], **{"config.json": b"{}"})
    user.hub.on_get[repo, "config.json"] = lambda: user.hub.push(repo, changed)
    ok(user.run("python evaluate.py --split dev --quiet"))
    assert user.hub.main[repo] != first
    resolved = {r[1].split("/resolve/")[1].split("/")[0] for r in user.hub.requests if "/resolve/" in r[1]}
    assert resolved == {"main", first}
    assert user.snapshot(repo).name == first
    assert sorted(p.name for p in user.snapshot(repo).iterdir()) == sorted(world["repos"][repo])
    ok(user.run("python evaluate.py --split dev --quiet", HF_HUB_OFFLINE="1"))


# --- the Hub says no, or may not be asked

def test_offline_before_the_first_run_says_what_to_do(user):
    """HF_HUB_OFFLINE=1 with an empty cache: one line that says to run once with a network."""
    one_line_error(user.run("python evaluate.py --split dev", HF_HUB_OFFLINE="1"),
                   "VMware/tinyroberta-mrqa", "HF_HUB_OFFLINE=1", "run once with a network", "local directory")
    assert user.requests() == []


@pytest.mark.parametrize("status, line, says", [
    (404, "python evaluate.py --split dev", ("--model VMware/tinyroberta-mrqa", "not a model", "check the name")),
    (401, "python train_distill.py --teacher roberta-large-mrqa", ("--teacher VMware/roberta-large-mrqa",
                                                                  "gated or private", "hf auth login", "HF_TOKEN")),
    (500, "python evaluate.py --split dev", ("--model VMware/tinyroberta-mrqa", "answered 500", "run again later")),
])
def test_hub_errors_say_what_to_do(user, status, line, says):
    repo = ALIASES["tinyroberta-mrqa"] if "evaluate" in line else ALIASES["roberta-large-mrqa"]
    user.hub.fail[repo] = status
    one_line_error(user.run(line + " --quiet"), *says)
    assert not list((user.root / "hf" / "hub").rglob("config.json"))
