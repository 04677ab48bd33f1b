"""End to end: a random-weight model through evaluate.py (on the generated dev set and, where ../shared/data is
there, 200 SQuAD questions) and the answer API."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from tinyqa import EncoderConfig, EncoderForQA, load_tokenizer, save_pretrained
from tinyqa.answerer import QuestionAnswerer
from tinyqa.mrqa import read_mrqa

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory, generated):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_pretrained(EncoderForQA(EncoderConfig(**SMALL)), d, tokenizer=load_tokenizer(str(generated["tokenizer"])))
    return d


def test_evaluate_200_questions(random_checkpoint, mrqa_path, tmp_path):
    out, met = tmp_path / "preds.json", tmp_path / "metrics.json"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(random_checkpoint), "--data",
                        str(mrqa_path), "--limit", "200", "--batch-size", "16", "--output", str(out),
                        "--metrics", str(met), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    preds = json.loads(out.read_text())
    exs = [ex for _, ex in zip(range(200), read_mrqa(mrqa_path))]
    assert set(preds) == {ex.qid for ex in exs}
    for ex in exs:
        assert preds[ex.qid] and preds[ex.qid] in ex.context, ex.qid
    m = json.loads(met.read_text())
    assert set(m) == {"datasets", "macro", "micro"} and m["datasets"][exs[0].dataset]["total"] == len(exs) == 200
    assert set(m["macro"]) == {"exact_match", "f1", "total"}
    assert "questions/s" in r.stdout


def test_answer_api_and_cli(random_checkpoint):
    qa = QuestionAnswerer.from_pretrained(str(random_checkpoint))
    context = "Hamlet is a tragedy written by William Shakespeare sometime between 1599 and 1601."
    a = qa.answer("Who wrote Hamlet?", context)
    assert a.text and context[a.start:a.end] == a.text
    many = qa.answer_batch(["Who wrote Hamlet?", "When?"], [context, "It was in 1601 or 1602."])
    assert many[0] == a and "It was in 1601 or 1602."[many[1].start:many[1].end] == many[1].text
    r = subprocess.run([sys.executable, "-m", "tinyqa", "answer", "--model", str(random_checkpoint), "--question",
                        "Who wrote Hamlet?", "--context", context, "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == a.text


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", "no-such-model", "--data",
                        str(tmp_path / "missing.jsonl.gz")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "tinyqa", "answer", "--model", "no-such-model", "--question", "q",
                        "--context", "c"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown model 'no-such-model'" in r.stderr and r.stderr.count("\n") == 1


def test_run_model_batches_equal_windows_run_alone():
    """Length-sorted, token-capped batches change nothing: every window's logits equal the model run on that
    window alone (no padding), and no CPU batch passes CPU_MAX_TOKENS padded tokens."""
    import numpy as np
    from tinyqa.features import Feature
    from tinyqa.cpu import CPU_MAX_TOKENS
    from tinyqa.infer import run_model
    torch.manual_seed(0)
    model = EncoderForQA(EncoderConfig(**SMALL, vocab_size=100)).eval()
    rng = np.random.default_rng(0)
    lengths = [384, 12, 200, 384, 384, 384, 5, 384, 90, 300, 384, 17]
    feats = [Feature(rng.integers(3, 100, n).astype(np.int32), np.zeros((n, 2), np.int32), i)
             for i, n in enumerate(lengths)]
    shapes = []
    # the embeddings see each padded batch (B, L): on the CPU the layers then see its real tokens only
    model.encoder.embeddings.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    starts, ends = run_model(model, feats, batch_size=64)
    assert all(b * L <= CPU_MAX_TOKENS for b, L in shapes) and sum(b for b, _ in shapes) == len(feats)
    assert max(b for b, _ in shapes) > 1  # short windows still share batches
    with torch.inference_mode():
        for f, s, e in zip(feats, starts, ends):
            ids = torch.from_numpy(f.input_ids.astype(np.int64))[None]
            out = model(ids, torch.ones_like(ids))
            assert s.shape == e.shape == (len(f.input_ids),)
            np.testing.assert_allclose(s, out.start_logits[0].numpy(), atol=1e-5)
            np.testing.assert_allclose(e, out.end_logits[0].numpy(), atol=1e-5)
