"""MiniLMv2's relation distillation (`train_distill.py --stage minilmv2`): the loss against values computed
by hand, zero for a student equal to its teacher, and the stage end to end on a student of another width
and head count than its teacher: it learns, it resumes bit for bit, DDP matches one process, and the
prediction-layer stage can follow it."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, synth_args

from tinyqa import EncoderConfig, EncoderForQA, TinyQAError, cli, load_model
from tinyqa.losses import minilm_loss, relation_kl
from tinyqa.minilm import capture_qkv, check_relation_setup, default_relation_heads, default_teacher_layer
from tinyqa.train import train


def hand_relation_kl(t, s, mask, heads):
    """The paper's definition written out with numpy loops: per window, relation head and real query
    token, KL over the real keys of softmax(x_a x_a^T / sqrt(d_r)); averaged over heads and real queries,
    then over windows."""
    total = []
    for b in range(t.shape[0]):
        real = np.flatnonzero(mask[b])
        per_query = []
        for q in real:
            kls = []
            for a in range(heads):
                def dist(x):
                    d = x.shape[-1] // heads
                    xa = x[b][:, a * d:(a + 1) * d]
                    logits = np.array([xa[q] @ xa[k] / math.sqrt(d) for k in real])
                    e = np.exp(logits - logits.max())
                    return e / e.sum()
                pt, ps = dist(t), dist(s)
                kls.append(float((pt * np.log(pt / ps)).sum()))
            per_query.append(np.mean(kls))
        total.append(np.mean(per_query))
    return float(np.mean(total))


def test_relation_kl_matches_the_definition_by_hand():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 8, generator=g)  # widths differ: 12 and 8
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = relation_kl(t, s, mask, heads=4).item()  # 4 relation heads: 3 and 2 features each
    assert got == pytest.approx(hand_relation_kl(t.numpy(), s.numpy(), mask.numpy(), 4), rel=1e-5)
    # padding beyond a window's real tokens changes nothing
    padded = [torch.cat([x, torch.randn(2, 3, x.shape[-1], generator=g)], dim=1) for x in (t, s)]
    assert relation_kl(*padded, torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1), 4).item() == \
        pytest.approx(got, rel=1e-5)


def test_relation_kl_gradient_is_the_definitions():
    """The student's gradient equals that of the definition computed the plain way (log-softmax of both
    relations, KL summed over keys), in float64, with padded keys and queries."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    s = torch.randn(2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])

    def plain(x, heads=4):
        B, L, H = x.shape
        x = x.view(B, L, heads, H // heads).transpose(1, 2)
        scores = (x @ x.transpose(-1, -2) / (H // heads) ** 0.5).masked_fill(~mask.bool()[:, None, None, :], -1e9)
        return torch.log_softmax(scores, dim=-1)
    kl = (plain(t).exp() * (plain(t) - plain(s))).sum(-1).mean(1)  # (B, L)
    real = mask.double()
    want = ((kl * real).sum(1) / real.sum(1)).mean()
    (want_grad,) = torch.autograd.grad(want, s)
    got = relation_kl(t, s, mask, heads=4)
    (got_grad,) = torch.autograd.grad(got, s)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(got_grad.double(), want_grad, rtol=1e-4, atol=1e-7), (got_grad - want_grad).abs().max()


def test_relations_stay_fp32_under_autocast():
    """Under bf16 autocast (CUDA's --precision bf16; the CPU's autocast rounds the same way) the relation
    loss is the fp32 one: its scores are not rounded to bf16 before the softmax."""
    g = torch.Generator().manual_seed(1)
    t, s = 3 * torch.randn(2, 64, 48, generator=g), 3 * torch.randn(2, 64, 32, generator=g)
    mask = torch.ones(2, 64, dtype=torch.long)
    want = hand_relation_kl(t.double().numpy(), s.double().numpy(), mask.numpy(), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = relation_kl(t, s, mask, heads=8)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-5)


def test_a_student_equal_to_its_teacher_has_zero_loss():
    torch.manual_seed(0)
    model = EncoderForQA(EncoderConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=40)).eval()
    ids, mask = torch.randint(5, 100, (3, 20)), torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    with capture_qkv(model, 2) as t:
        model(ids, mask)
    with capture_qkv(model, 2) as s:
        model(ids, mask)
    total, qq, kk, vv = minilm_loss(t, s, mask, heads=8)
    assert abs(total.item()) < 1e-6 and all(abs(x.item()) < 1e-6 for x in (qq, kk, vv))


def test_defaults_and_refusals():
    assert default_teacher_layer(24) == 21 and default_teacher_layer(12) == 12 and default_teacher_layer(6) == 6
    assert default_relation_heads(1024, 384) == 64 and default_relation_heads(384, 256) == 64
    assert default_relation_heads(128, 48) == 8 and default_relation_heads(128, 64) == 16
    big = EncoderConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    small = EncoderConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3)
    assert check_relation_setup(big, small) == (2, 8)
    with pytest.raises(TinyQAError, match="does not split into 5"):
        check_relation_setup(big, small, heads=5)
    with pytest.raises(TinyQAError, match="layers 1 to 2"):
        check_relation_setup(big, small, teacher_layer=3)


@pytest.fixture(scope="module")
def narrow_cfg(synth):
    """A student that cannot start from the teacher's layers: 48 wide with 3 heads (the teacher: 128, 4)."""
    cfg = json.loads(open(synth["student_cfg"]).read())
    cfg.update(hidden_size=48, num_attention_heads=3, intermediate_size=96, num_hidden_layers=2)
    path = synth["dir"] / "narrow.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def minilmv2(synth, teacher, out, *extra):
    return cli.distill_args(synth_args(synth, out, "--stage", "minilmv2", "--teacher", str(teacher), *extra))


def relation_loss_of(folder, teacher, synth):
    """The student's held-out relation loss to the teacher (dev windows), one number."""
    from tinyqa.data import read_files
    from tinyqa.features import FeaturizerConfig, collate, featurize
    from tinyqa.tokenizer import load_tokenizer
    student, t = load_model(str(folder)), load_model(str(teacher))
    exs = [ex for _, _, xs in read_files([synth["dev"]]) for ex in xs][:40]
    b = collate(featurize(exs, load_tokenizer(synth["tok"]), FeaturizerConfig(128, 32), with_offsets=False),
                pad_id=1)
    with torch.no_grad(), capture_qkv(t, 2) as tq, capture_qkv(student, 2) as sq:
        t(b["input_ids"], b["attention_mask"])
        student(b["input_ids"], b["attention_mask"])
    return minilm_loss(tq, sq, b["attention_mask"], 8)[0].item()


def test_the_stage_teaches_a_narrower_student_and_the_prediction_stage_follows(synth, teacher, narrow_cfg, tmp_path):
    common = ["--init-config", narrow_cfg, "--epochs", "2", "--batch-size", "32", "--lr", "2e-3", "--limit", "300"]
    train(minilmv2(synth, teacher, tmp_path / "rel", *common, "--stop-after", "1"))
    train(minilmv2(synth, teacher, tmp_path / "rel-full", *common))
    rows = [json.loads(line) for line in (tmp_path / "rel-full" / "log.jsonl").read_text().splitlines()]
    assert {"qq_loss", "kk_loss", "vv_loss"} <= rows[0].keys() and "teacher_s" in rows[0]
    before, after = relation_loss_of(tmp_path / "rel" / "checkpoint-1", teacher, synth), \
        relation_loss_of(tmp_path / "rel-full", teacher, synth)
    print(f"held-out relation loss {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before, (before, after)
    student = load_model(str(tmp_path / "rel-full"))
    assert student.config.hidden_size == 48 and student.config.num_attention_heads == 3
    train(cli.distill_args(synth_args(synth, tmp_path / "pred", "--teacher", str(teacher), "--student",
                                      str(tmp_path / "rel-full"), "--epochs", "1", "--batch-size", "32", "--limit", "60",
                                      "--teacher-cache", str(tmp_path / "cache"))))
    assert (tmp_path / "pred" / "model.safetensors").exists()


def test_resume_mid_stage_is_exact(synth, teacher, narrow_cfg, tmp_path):
    extra = ["--init-config", narrow_cfg, "--epochs", "2", "--batch-size", "64", "--lr", "1e-3", "--limit", "150"]
    full = train(minilmv2(synth, teacher, tmp_path / "full", *extra))
    train(minilmv2(synth, teacher, tmp_path / "broken", *extra, "--stop-after", "5", "--save-every", "2"))
    resumed = train(cli.distill_args(["--resume", str(tmp_path / "broken" / "checkpoint-4"), "--quiet"]))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_ddp_two_processes_match_one(synth, teacher, narrow_cfg, tmp_path):
    base = [str(ROOT / "train_distill.py"), *synth_args(synth, tmp_path / "x"), "--stage", "minilmv2", "--teacher",
            str(teacher), "--init-config", narrow_cfg, "--epochs", "1", "--batch-size", "32", "--lr", "1e-3",
            "--limit", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name, launch in (("one", [sys.executable]),
                         ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                  "--master-port", "29547"])):
        argv = list(base)
        argv[argv.index("--out") + 1] = str(tmp_path / name)
        r = subprocess.run([*launch, *argv], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_model(str(tmp_path / "one")), load_model(str(tmp_path / "two"))
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max().item() <= 1e-5, k
