"""The on-disk feature store: the same windows and labels as featurize, keyed and rebuilt like the teacher cache,
safe against kills and concurrent builders, shared by DDP ranks; and evaluate.py streaming chunk by chunk."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, synth_args

import tinyqa.store as store_mod
from tinyqa import load_model, load_tokenizer
from tinyqa.errors import TinyQAError
from tinyqa.features import FeaturizerConfig, collate, cut_windows, featurize, pair_layout
from tinyqa.mrqa import read_mrqa
from tinyqa.synthetic import make_dataset, train_tokenizer, write_mrqa
from tinyqa.tokenizer import save_tokenizer
from tinyqa import cli
from tinyqa.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Generated MRQA train data, a fifth of its contexts long enough for several windows, a few questions
    without an answer span; a byte-level BPE and a WordPiece tokenizer trained on it."""
    d = tmp_path_factory.mktemp("store-data")
    rows = make_dataset(60, seed=5, long_fraction=0.2, long_people=(8, 10))
    rows[3]["qas"][0]["detected_answers"] = []  # no span: left out of training, with a notice
    write_mrqa(d / "train.jsonl.gz", rows)
    texts = [r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]]
    save_tokenizer(train_tokenizer(texts, 800), d / "bpe")
    from tinyqa.synthetic import train_wordpiece
    save_tokenizer(train_wordpiece(texts, 800), d / "wordpiece")
    return d


def expected(path, tok, fcfg):
    """What training featurized in memory before the store: every example with a span, featurize()d."""
    exs = [ex for ex in read_mrqa(path) if ex.span is not None]
    return featurize(exs, tok, fcfg, with_labels=True, with_offsets=False)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_store_gives_featurize_windows_and_labels(data, tmp_path, monkeypatch, kind):
    monkeypatch.setattr(store_mod, "CHUNK_QUESTIONS", 7)  # many chunks: contexts and windows cross their borders
    tok = load_tokenizer(str(data / kind))
    fcfg = FeaturizerConfig(96, 24, 64)
    s = store_mod.open_store(str(tmp_path), [str(data / "train.jsonl.gz")], tok, fcfg, log=lambda *a: None,
                             progress=False)
    feats = expected(data / "train.jsonl.gz", tok, fcfg)
    assert len(s) == len(feats) > s.info["examples"] > 0 and s.info["no_span"] == 1
    assert np.array_equal(s.lengths, [len(f.input_ids) for f in feats])
    assert [int(x) for x in s.windows[:, 0]] == [f.example_index for f in feats]
    pad = pair_layout(tok).pad_id
    for idx in ([0, 1, 2], list(range(len(feats)))[::-1], [5, len(feats) - 1, 17]):
        got, want = s.batch(idx, pad), collate([feats[i] for i in idx], with_labels=True, pad_id=pad)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    if kind == "wordpiece":  # token types rebuilt: [CLS] question [SEP] are 0, the context and last [SEP] 1
        assert s.batch([0], pad)["token_type_ids"].sum() > 0
    assert s.ids.dtype == np.uint16  # 800 tokens fit two bytes


def _rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from Linux's /proc")
def test_reading_a_whole_store_file_does_not_grow_resident_memory(tmp_path):
    """RowFile (the store's ids, the teacher's logits) gives the rows np.fromfile gives, with a header skipped,
    and an epoch over a 64 MB file leaves the process's RSS where it was: the bytes stay in the page cache.
    A memory map of the same file, read the same way, grows it by the whole file (checked here too, so the
    measurement itself is shown able to see it)."""
    from tinyqa.files import RowFile
    rows = np.random.default_rng(0).integers(-30000, 30000, size=(16 << 20, 2), dtype=np.int16)  # 64 MB
    path = tmp_path / "rows.bin"
    with open(path, "wb") as f:
        f.write(b"header!")
        f.write(rows.tobytes())
    r = RowFile(str(path), np.int16, (2,), start=7)
    assert len(r) == len(rows)
    assert np.array_equal(r.read(5, 9), rows[5:9]) and r.read(3, 3).shape == (0, 2)
    with pytest.raises(TinyQAError, match="rows.bin"):
        r.read(len(rows) - 1, len(rows) + 1)
    step = 1 << 16
    before = _rss_kb("VmRSS")
    total = sum(int(r.read(a, a + step)[:, 0].astype(np.int64).sum()) for a in range(0, len(rows), step))
    grown_pread = _rss_kb("VmRSS") - before
    assert total == int(rows[:, 0].astype(np.int64).sum())
    mapped = np.memmap(path, np.int16, "r", offset=7, shape=rows.shape)
    before = _rss_kb("VmRSS")
    total = sum(int(np.asarray(mapped[a:a + step, 0]).astype(np.int64).sum()) for a in range(0, len(rows), step))
    grown_mmap = _rss_kb("VmRSS") - before
    assert grown_mmap > 48_000 and grown_pread < 8_000, (grown_pread, grown_mmap)


def test_row_file_without_pread_reads_the_same_rows(tmp_path, monkeypatch):
    """Where the OS has no pread (Windows), RowFile seeks and reads: the same rows."""
    from tinyqa.files import RowFile
    rows = np.arange(3000, dtype=np.int32).reshape(-1, 3)
    (tmp_path / "r.bin").write_bytes(b"hdr" + rows.tobytes())
    r = RowFile(str(tmp_path / "r.bin"), np.int32, (3,), start=3)
    monkeypatch.delattr(os, "pread", raising=False)
    assert np.array_equal(r.read(7, 12), rows[7:12]) and np.array_equal(r.read(0, len(rows)), rows)


def test_store_is_reused_and_rebuilt_when_its_key_changes(data, tmp_path, monkeypatch):
    builds = []
    real = store_mod.build
    monkeypatch.setattr(store_mod, "build", lambda *a, **k: (builds.append(1), real(*a, **k)))
    tok = load_tokenizer(str(data / "bpe"))
    train_file = tmp_path / "train.jsonl.gz"
    train_file.write_bytes((data / "train.jsonl.gz").read_bytes())
    opened = lambda fcfg, tok=tok, limit=None: store_mod.open_store(str(tmp_path / "root"), [str(train_file)], tok,
                                                                    fcfg, limit, log=lambda *a: None, progress=False)
    a = opened(FeaturizerConfig(96, 24))
    assert len(builds) == 1
    b = opened(FeaturizerConfig(96, 24))
    assert len(builds) == 1 and b.folder == a.folder  # reused
    opened(FeaturizerConfig(96, 32))
    assert len(builds) == 2  # a featurizer setting
    opened(FeaturizerConfig(96, 24), limit=10)
    assert len(builds) == 3  # --limit
    opened(FeaturizerConfig(96, 24), tok=load_tokenizer(str(data / "wordpiece")))
    assert len(builds) == 4  # the tokenizer
    write_mrqa(train_file, make_dataset(60, seed=6))  # other content under the same name
    opened(FeaturizerConfig(96, 24))
    assert len(builds) == 5
    folders = [p for p in (tmp_path / "root").iterdir() if p.is_dir()]
    assert len(folders) == 5 and not [p for p in folders if ".tmp-" in p.name]


def test_a_killed_build_leaves_no_store_and_is_rebuilt(data, tmp_path, monkeypatch):
    tok = load_tokenizer(str(data / "bpe"))
    fcfg = FeaturizerConfig(96, 24)
    root = tmp_path / "root"
    # Ctrl-C in the middle of a build: nothing under the store's name, and nothing temporary left
    monkeypatch.setattr(store_mod, "CHUNK_QUESTIONS", 7)
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return cut_windows(*a, **k)
    monkeypatch.setattr(store_mod, "cut_windows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store_mod.open_store(str(root), [str(data / "train.jsonl.gz")], tok, fcfg, log=lambda *a: None, progress=False)
    assert [p.name for p in root.iterdir() if p.is_dir()] == []
    monkeypatch.undo()
    # SIGKILL (no cleanup runs): the half-written temporary folder stays, under a name no reader takes
    big = tmp_path / "big.jsonl.gz"
    write_mrqa(big, make_dataset(1500, seed=8))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tinyqa.store as s; s.CHUNK_QUESTIONS = 50; "
            "from tinyqa import load_tokenizer; from tinyqa.features import FeaturizerConfig; "
            "s.open_store(sys.argv[2], [sys.argv[3]], load_tokenizer(sys.argv[4]), FeaturizerConfig(96, 24), "
            "progress=False)")
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(root), str(big), str(data / "bpe")])
    deadline = time.time() + 120
    while time.time() < deadline and not any(".tmp-" in q.name and (q / "ids.bin").exists()
                                             and (q / "ids.bin").stat().st_size > 0 for q in root.iterdir()):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = [q for q in root.iterdir() if q.is_dir()]
    assert len(left) == 1 and ".tmp-" in left[0].name and not store_mod.is_complete(left[0])
    s = store_mod.open_store(str(root), [str(big)], tok, fcfg, log=lambda *a: None, progress=False)
    assert len(s) == len(expected(big, tok, fcfg))  # built whole, beside the leftover


def test_two_processes_wanting_the_same_store_build_it_once(data, tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tinyqa.store import open_store; "
            "from tinyqa import load_tokenizer; from tinyqa.features import FeaturizerConfig; "
            "s = open_store(sys.argv[2], [sys.argv[3]], load_tokenizer(sys.argv[4]), FeaturizerConfig(96, 24), "
            "progress=False); print('WINDOWS', len(s))")
    runs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path), str(data / "train.jsonl.gz"),
                              str(data / "bpe")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outs
    assert sum("featurizing the training data once" in o for o, _ in outs) == 1, outs
    assert len({line for o, _ in outs for line in o.splitlines() if line.startswith("WINDOWS")}) == 1
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


def test_ddp_ranks_share_the_store_and_split_the_teacher_cache(synth, teacher, tmp_path):
    """torchrun --nproc-per-node 2: one store for both ranks, the teacher pass split over them into one
    cache equal, byte for byte, to the one a single process computes; the same weights as one process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TINYQA_CACHE=str(tmp_path / "cache"))
    outs = {}
    for name, launch in (("one", [sys.executable]),
                         ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                  "--master-port", "29547"])):
        argv = [str(ROOT / "train_distill.py"), *synth_args(synth, tmp_path / name), "--teacher", str(teacher),
                "--init-config", synth["student_cfg"], "--epochs", "1", "--batch-size", "32", "--lr", "1e-3",
                "--limit", "60", "--teacher-cache", str(tmp_path / f"tcache-{name}"), "--feature-store",
                str(tmp_path / f"store-{name}")]
        r = subprocess.run([*launch, *argv], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = r.stdout
    assert "computing teacher logits once" in outs["two"] and "(2 processes)" in outs["two"]
    stores = {n: [p for p in (tmp_path / f"store-{n}").iterdir() if p.is_dir()] for n in ("one", "two")}
    assert len(stores["two"]) == 1 and len(stores["one"]) == 1
    caches = {n: [p for p in (tmp_path / f"tcache-{n}").iterdir() if p.is_dir()] for n in ("one", "two")}
    assert len(caches["two"]) == 1
    assert (caches["one"][0] / "logits.npy").read_bytes() == (caches["two"][0] / "logits.npy").read_bytes()
    a, b = load_model(str(tmp_path / "one")), load_model(str(tmp_path / "two"))
    zero_grad = {"qa_outputs.bias", f"encoder.layers.{a.config.num_hidden_layers - 1}.ln_ffn.bias"}
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max().item() <= (1e-2 if k in zero_grad else 1e-5), k  # see test_train's DDP test


def test_training_reads_the_store_and_a_resume_reuses_it(synth, tmp_path):
    out = tmp_path / "run"
    store = tmp_path / "store"
    args = synth_args(synth, out, "--init-config", synth["student_cfg"], "--epochs", "2", "--batch-size", "32",
                      "--lr", "1e-3", "--limit", "40", "--feature-store", str(store))
    full = train(cli.finetune_args(args))
    (folder,) = [p for p in store.iterdir() if p.is_dir()]
    info = json.loads((folder / "key.json").read_text())
    assert info["examples"] == 40 and info["windows"] >= 40
    stamp = (folder / "ids.bin").stat().st_mtime_ns
    train(cli.finetune_args([*args[:args.index("--out") + 1], str(tmp_path / "broken"),
                                          *args[args.index("--out") + 2:], "--stop-after", "2"]))
    resumed = train(cli.finetune_args(["--resume", str(tmp_path / "broken" / "checkpoint-2"), "--quiet"]))
    assert (folder / "ids.bin").stat().st_mtime_ns == stamp and len([p for p in store.iterdir() if p.is_dir()]) == 1
    for (k, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), k


# --- evaluate.py, chunk by chunk

def test_evaluate_streams_chunks_with_the_same_predictions(mrqa_path, best_tokenizer_dir, tmp_path, monkeypatch):
    """evaluate.py featurizes, runs and decodes 97 questions at a time: predictions.json equals
    what one pass over the whole file gives (infer.predict), on SQuAD dev where ../shared is there."""
    from tinyqa import EncoderConfig, EncoderForQA, save_pretrained
    from tinyqa.infer import predict
    tok = load_tokenizer(str(best_tokenizer_dir))
    torch.manual_seed(0)
    model = EncoderForQA(EncoderConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=128)).eval()
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    monkeypatch.setattr(evaluate, "CHUNK_QUESTIONS", 97)
    evaluate.main(["--model", str(tmp_path / "ckpt"), "--data", str(mrqa_path), "--output", str(tmp_path / "p.json"),
                   "--quiet"])
    streamed = json.loads((tmp_path / "p.json").read_text())
    examples = list(read_mrqa(mrqa_path))
    whole = {q: p.text for q, p in predict(model, tok, examples, FeaturizerConfig(), batch_size=64).items()}
    assert len(streamed) == len(examples) > 97 and streamed == whole
