"""Shared test helpers: where ../shared/data is, generated text and tokenizer, SQuAD dev pairs, assert_close.

Every test that needs text and a tokenizer runs on generated ones (a synthetic MRQA dev file and a byte-level
BPE trained on it with RoBERTa's special tokens), so a fresh clone runs all of them; where ../shared/data is
there, the same tests run again on the real RoBERTa tokenizer and SQuAD dev (the `source` parameter:
"generated", "shared"). Only what is about the real data itself (e.g. SQuAD's 10,570 questions) is shared-only.
"""
import gzip
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory):
    """Feature stores, teacher logits and file hashes of a test run land in its temporary folder, never in
    the user's ~/.cache/tinyqa (subprocesses inherit the variable)."""
    old = os.environ.get("TINYQA_CACHE")
    os.environ["TINYQA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("TINYQA_CACHE", None)
    else:
        os.environ["TINYQA_CACHE"] = old


def shared_data_dir():
    for cand in (os.environ.get("TINYQA_SHARED"), ROOT.parent / "shared", ROOT / "shared"):
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand) / "data"
        if cand and Path(cand).name == "data" and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def shared():
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data not found: set TINYQA_SHARED to the folder holding data/ "
                    "(roberta-tokenizer, configs, mrqa)")
    return d


# Text that synthetic MRQA lacks: odd whitespace, typographic punctuation, several scripts, emoji, and
# special-token strings written in plain text.
EDGE_PAIRS = [
    ("  Who   wrote\tit?", "It was written  by Ada Lovelace in 1843.\nShe was a mathematician.  "),
    ("Wo liegt Köln?", "Çà et là: naïve façade, «Zitat» … Köln liegt am Rhein; 東京 and Москва too."),
    ("What is 🎉?", "The party 🎉🎉 was hosted by José 😀 Núñez in Zürich at 7:30pm (UTC+1)."),
    # (not <mask>: transformers 5 builds it from bare vocab.json + merges.txt without the lstrip that the
    # published tokenizer.json and transformers 4 give it, so there the two transformers disagree)
    ("What about <s>?", "Literal <s> and </s> appear in this text, as does <pad>."),
]


@pytest.fixture(scope="session")
def generated(tmp_path_factory):
    """A synthetic MRQA dev file (a fifth of its contexts long enough for several 384-token windows), its
    (question, context) pairs plus EDGE_PAIRS, and a byte-level BPE trained on them, written as RoBERTa's
    vocab.json + merges.txt."""
    from tinyqa.synthetic import make_dataset, train_tokenizer, write_mrqa
    d = tmp_path_factory.mktemp("generated")
    rows = make_dataset(100, seed=11, long_fraction=0.2, long_people=(12, 16), split="dev")
    write_mrqa(d / "dev.jsonl.gz", rows, dataset="Synthetic", split="dev")
    pairs = [(q["question"], r["context"]) for r in rows for q in r["qas"]] + EDGE_PAIRS
    tok = train_tokenizer([c for _, c in pairs] + [q for q, _ in pairs], vocab_size=2000)
    (d / "tokenizer").mkdir()
    tok.model.save(str(d / "tokenizer"))  # vocab.json + merges.txt
    return {"tokenizer": d / "tokenizer", "pairs": pairs, "dev": d / "dev.jsonl.gz"}


@pytest.fixture(scope="session", params=["generated", "shared"])
def source(request):
    if request.param == "shared" and shared_data_dir() is None:
        pytest.skip("real-text coverage: shared data not found (set TINYQA_SHARED to the folder holding data/)")
    return request.param


@pytest.fixture(scope="session")
def tokenizer_dir(source, generated):
    """A RoBERTa-style byte-level BPE folder: the generated one, or the real RoBERTa tokenizer."""
    return generated["tokenizer"] if source == "generated" else shared_data_dir() / "roberta-tokenizer"


@pytest.fixture(scope="session")
def text_pairs(source, generated, request):
    """(question, context) pairs: the generated ones, or every SQuAD dev question."""
    return generated["pairs"] if source == "generated" else request.getfixturevalue("squad_pairs")


@pytest.fixture(scope="session")
def best_tokenizer_dir(generated):
    """For tests that should run once, not once per source: the real RoBERTa tokenizer where ../shared is
    there, else the generated one (so they still run on a fresh clone)."""
    d = shared_data_dir()
    return d / "roberta-tokenizer" if d is not None else generated["tokenizer"]


@pytest.fixture(scope="session")
def best_pairs(generated, request):
    """(question, context) pairs to go with best_tokenizer_dir: every SQuAD dev question, else the generated ones."""
    return request.getfixturevalue("squad_pairs") if shared_data_dir() is not None else generated["pairs"]


@pytest.fixture(scope="session")
def mrqa_path(source, generated):
    """An MRQA dev file: the synthetic one, or SQuAD dev."""
    return generated["dev"] if source == "generated" else shared_data_dir() / "mrqa" / "SQuAD-dev-v1.1.jsonl.gz"


@pytest.fixture(scope="session")
def squad_path(shared):
    return shared / "mrqa" / "SQuAD-dev-v1.1.jsonl.gz"


@pytest.fixture(scope="session")
def squad_pairs(squad_path):
    """(question, context) for every SQuAD dev question, read with plain json (independent of tinyqa)."""
    pairs = []
    with gzip.open(squad_path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "header" in row:
                continue
            pairs += [(qa["question"], row["context"]) for qa in row["qas"]]
    return pairs


# --- generated training data and a trained teacher, shared by the training tests (test_train, test_intermediate)

@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A synthetic MRQA train (300 contexts) and dev (40) file, a BPE trained on the train text, and three
    model configs on its vocabulary: teacher 2 x 128, student 1 x 64, a 1 x 32 with dropout on (4 heads each)."""
    import json
    from tinyqa.synthetic import make_dataset, train_tokenizer, write_mrqa
    from tinyqa.tokenizer import save_tokenizer
    d = tmp_path_factory.mktemp("synth")
    train_rows, dev_rows = make_dataset(300, seed=1), make_dataset(40, seed=2, split="dev")
    write_mrqa(d / "train.jsonl.gz", train_rows)
    write_mrqa(d / "dev.jsonl.gz", dev_rows, split="dev")
    tok = train_tokenizer([r["context"] for r in train_rows] + [q["question"] for r in train_rows for q in r["qas"]], 1200)
    (d / "tok").mkdir()
    save_tokenizer(tok, d / "tok")

    def config(name, layers, hidden, dropout=0.0):
        cfg = dict(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                   num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=130,
                   hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        (d / name).write_text(json.dumps(cfg))
        return str(d / name)
    return {"dir": d, "train": str(d / "train.jsonl.gz"), "dev": str(d / "dev.jsonl.gz"), "tok": str(d / "tok"),
            "teacher_cfg": config("teacher.json", 2, 128), "student_cfg": config("student.json", 1, 64),
            "dropout_cfg": config("dropout.json", 1, 32, dropout=0.1)}


def synth_args(synth, out, *extra):
    """The training flags every test run on `synth` shares: its files, 128-token windows, no checkpoints."""
    return ["--train", synth["train"], "--tokenizer", synth["tok"], "--max-seq-len", "128", "--doc-stride", "32",
            "--out", str(out), "--quiet", "--save-every", "0", *extra]


@pytest.fixture(scope="session")
def teacher(synth):
    """A 2 x 128 teacher fine-tuned from random weights on synth's train file (dev F1 about 31)."""
    from tinyqa import cli
    from tinyqa.train import train
    out = synth["dir"] / "teacher"
    train(cli.finetune_args(synth_args(synth, out, "--init-config", synth["teacher_cfg"], "--epochs", "6",
                                                    "--batch-size", "32", "--lr", "2e-3", "--warmup-proportion", "0.1")))
    return out


def assert_close(actual, expected, atol, what=""):
    """torch.testing-style check that always reports the max and mean absolute difference."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    assert diff.max().item() <= atol, (f"{what}: max abs diff {diff.max().item():.3g} > {atol} "
                                       f"(mean {diff.mean().item():.3g})")
    return diff.max().item()
