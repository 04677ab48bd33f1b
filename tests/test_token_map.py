"""Distillation across tokenizers (tinyqa/token_map.py): the rules by hand, the same tokenizer mapping every
position to itself on every SQuAD dev window, mass conserved and the teacher's best answer kept across
tokenizer families, the loss on carried probabilities, and the carried cache computed in shards."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, synth_args

from tinyqa import cli, load_model
from tinyqa.errors import TinyQAError
from tinyqa.features import FeaturizerConfig, pair_layout
from tinyqa.losses import distillation_loss, kd_loss
from tinyqa.mrqa import read_mrqa
from tinyqa.synthetic import train_wordpiece
from tinyqa.token_map import CONTEXT, Positions, TokenBridge, carry, position_map
from tinyqa.tokenizer import load_tokenizer, save_tokenizer
from tinyqa.train import train


def window(seg, spans):
    """Positions from a list of segment codes and (a, b) pairs."""
    a, b = zip(*spans)
    return Positions(np.array(seg, np.int8), np.array(a, np.int64), np.array(b, np.int64))


def test_the_rules_by_hand():
    # context "Paris lies here\u200b now" (the zero-width space at 15 is a character the student drops)
    # student: <s> Q </s></s> "Paris"(0,5) "lies"(6,10) "here"(11,15) "now"(17,20) </s>
    # teacher: [CLS] Q1 Q2 [SEP] "par"(0,3) "##is"(3,5) "lies"(6,10) "here"(11,15) "\u200b"(15,16) "now"(17,20) [SEP]
    student = window([0, 1, 2, 2, 3, 3, 3, 3, 4], [(0, 1), (0, 4), (0, 1), (1, 2), (0, 5), (6, 10), (11, 15), (17, 20),
                                                   (0, 1)])
    teacher = window([0, 1, 1, 2, 3, 3, 3, 3, 3, 3, 4], [(0, 1), (0, 4), (5, 8), (0, 1), (0, 3), (3, 5), (6, 10),
                                                         (11, 15), (15, 16), (17, 20), (0, 1)])
    start_to, end_to = position_map(student, teacher)
    # [CLS] -> <s>; Q1 -> Q; Q2 (past the student's question) -> 0; [SEP] -> the first </s>; "par" and "##is"
    # start inside "Paris" and end inside it; the zero-width space starts before "now" (next) and ends after
    # "here" (previous); the last [SEP] -> </s>
    assert start_to.tolist() == [0, 1, 0, 2, 4, 4, 5, 6, 7, 7, 8]
    assert end_to.tolist() == [0, 1, 0, 2, 4, 4, 5, 6, 6, 7, 8]
    p = np.arange(1, 12, dtype=np.float64)
    p /= p.sum()
    q_start, q_end = carry(p, p[::-1].copy(), start_to, end_to, len(student.seg))
    assert q_start == pytest.approx([p[0] + p[2], p[1], p[3], 0, p[4] + p[5], p[6], p[7], p[8] + p[9], p[10]])
    r = p[::-1]
    assert q_end == pytest.approx([r[0] + r[2], r[1], r[3], 0, r[4] + r[5], r[6], r[7] + r[8], r[9], r[10]])
    assert q_start.sum() == pytest.approx(1) and q_end.sum() == pytest.approx(1)


def test_identical_offsets_are_matched_in_order():
    """Byte-level BPE's pieces of one character share its offsets: the same tokenizer maps each to itself."""
    s = window([0, 3, 3, 3, 4], [(0, 1), (0, 1), (0, 1), (1, 3), (0, 1)])
    assert [x.tolist() for x in position_map(s, s)] == [[0, 1, 2, 3, 4]] * 2
    fewer = window([0, 3, 3, 4], [(0, 1), (0, 1), (1, 3), (0, 1)])  # the other side keeps the character whole
    start_to, end_to = position_map(fewer, s)
    assert start_to.tolist() == [0, 1, 1, 2, 3] and end_to.tolist() == [0, 1, 1, 2, 3]


@pytest.fixture(scope="module")
def squad_dev(squad_path):
    return list(read_mrqa(squad_path))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, squad_dev, best_tokenizer_dir):
    """RoBERTa's byte-level BPE, a WordPiece (all-MiniLM-L6-v2's real uncased one when its package is
    installed, else one trained on the dev text) and a SentencePiece-style Unigram of 8,000 pieces trained on
    it (no DeBERTa-v3 tokenizer can be had offline; one of 3,000 pieces splits words far more often than a
    real one of 128k, which blurs a weakly peaked teacher more: docs/distillation.md)."""
    from test_family import minilm_folder, train_unigram
    texts = [ex.context for ex in squad_dev[::3]] + [ex.question for ex in squad_dev[::4]]
    wp = minilm_folder(tmp_path_factory)
    toks = {"bpe": load_tokenizer(str(best_tokenizer_dir)),
            "wordpiece": load_tokenizer(str(wp)) if wp else train_wordpiece(texts, 8000),
            "unigram": train_unigram(texts, 8000)}
    for name in ("wordpiece", "unigram"):
        d = tmp_path_factory.mktemp(name)
        save_tokenizer(toks[name], d)
        toks[name] = load_tokenizer(str(d))  # as training loads it
    return toks


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("name", ["bpe", "wordpiece"])
def test_the_same_tokenizer_maps_every_squad_dev_window_to_itself(squad_dev, tokenizers, name):
    tok = tokenizers[name]
    pairs = TokenBridge(tok, tok, FeaturizerConfig(), 512).pair(squad_dev)
    assert len(pairs) > len(squad_dev)  # some questions need several windows
    rng = np.random.default_rng(0)
    for p in pairs:
        assert np.array_equal(p.teacher_ids, p.student_ids) and not p.cut
        n = len(p.student_ids)
        assert np.array_equal(p.start_to, np.arange(n)) and np.array_equal(p.end_to, np.arange(n))
    for p in pairs[::50]:  # the carried targets are the softmax itself, to float precision
        logits = rng.normal(0, 3, (2, len(p.teacher_ids))) / 1.5
        q_start, q_end = carry(softmax(logits[0]), softmax(logits[1]), p.start_to, p.end_to, len(p.student_ids))
        np.testing.assert_allclose(q_start, softmax(logits[0]), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(q_end, softmax(logits[1]), rtol=1e-12, atol=1e-15)


def best_span(p_start, p_end, at, max_len=30):
    """(i, j, score) of the best span over positions `at` (one window's context tokens), j >= i, j - i < max_len."""
    m = np.outer(p_start[at], p_end[at])
    m = np.triu(m) - np.triu(m, max_len)
    i, j = np.unravel_index(np.argmax(m), m.shape)
    return at[i], at[j], m[i, j]


def teacher_like_logits(rng, teacher, answer):
    """Start and end logits shaped like a trained reader's: noise, and a peak (of random height) at the gold
    answer's first and last teacher tokens where this window holds them, else at [CLS]."""
    ls, le = rng.normal(0, 1, len(teacher.seg)), rng.normal(0, 1, len(teacher.seg))
    ctx = np.flatnonzero(teacher.seg == CONTEXT)
    a, b = answer
    i = ctx[(teacher.a[ctx] <= a) & (teacher.b[ctx] > a)]
    j = ctx[(teacher.a[ctx] < b) & (teacher.b[ctx] >= b)]
    first, last = (i[0], j[-1]) if len(i) and len(j) else (0, 0)
    height = rng.uniform(4, 10)
    ls[first] += height
    le[last] += height
    return ls, le


@pytest.mark.parametrize("student,teacher", [("bpe", "wordpiece"), ("wordpiece", "bpe"), ("bpe", "unigram")])
def test_across_tokenizers_mass_is_kept_and_the_best_answer_too(squad_dev, tokenizers, student, teacher):
    """On every SQuAD dev question: the carried distributions sum to 1, and where the teacher's best answer
    (over the question's windows) can be written in student tokens, it is the carried distributions' best
    answer on >= 99% of the questions."""
    pairs = TokenBridge(tokenizers[student], tokenizers[teacher], FeaturizerConfig(), 512).pair(squad_dev)
    from tinyqa.features import featurize
    owners = [f.example_index for f in featurize(squad_dev, tokenizers[student], FeaturizerConfig(),
                                                 with_labels=False, with_offsets=False)]
    rng, best, worst_mass = np.random.default_rng(0), {}, 0.0
    for p, q in zip(pairs, owners):
        ex = squad_dev[q]
        ls, le = teacher_like_logits(rng, p.teacher, ex.span or (0, 0))
        ps, pe = softmax(ls / 1.5), softmax(le / 1.5)
        qs, qe = carry(ps, pe, p.start_to, p.end_to, len(p.student_ids))
        worst_mass = max(worst_mass, abs(qs.sum() - 1), abs(qe.sum() - 1))
        t_at, s_at = np.flatnonzero(p.teacher.seg == CONTEXT), np.flatnonzero(p.student.seg == CONTEXT)
        i, j, score = best_span(ps, pe, t_at)
        if q in best and best[q][0] >= score:
            continue
        chars = (p.teacher.a[i], p.teacher.b[j])  # the teacher's answer, in characters of the context
        expressible = (p.student.a[s_at] == chars[0]).any() and (p.student.b[s_at] == chars[1]).any()
        k, l, _ = best_span(qs, qe, s_at)
        best[q] = (score, expressible, (p.student.a[k], p.student.b[l]) == chars)
    assert worst_mass < 1e-9
    kept = [same for _, expressible, same in best.values() if expressible]
    print(f"{teacher} -> {student}: {len(kept)} of {len(best)} questions' teacher answers expressible in student "
          f"tokens; the carried best answer is the teacher's on {np.mean(kept):.2%}")
    assert len(best) == len(squad_dev) and len(kept) > 0.8 * len(best)
    assert np.mean(kept) >= 0.99


def test_the_loss_on_carried_probabilities_is_the_loss_on_logits():
    """With probabilities that are softmax(logits / T) (what the same tokenizer carries), the KD term and the
    total are today's, computed from the logits."""
    torch.manual_seed(0)
    s_start, s_end, t_start, t_end = (torch.randn(3, 7) * 2 for _ in range(4))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    T = 1.5
    probs = [torch.softmax(t.masked_fill(mask == 0, -1e9) / T, dim=-1) for t in (t_start, t_end)]
    assert kd_loss(s_start, probs[0], mask, T, teacher_probabilities=True).item() == \
        pytest.approx(kd_loss(s_start, t_start, mask, T).item(), rel=1e-5)
    labels = torch.tensor([1, 2, 3]), torch.tensor([2, 2, 4])
    a = distillation_loss(s_start, s_end, t_start, t_end, *labels, mask, 0.75, T)
    b = distillation_loss(s_start, s_end, *probs, *labels, mask, 0.75, T, teacher_probabilities=True)
    assert [x.item() for x in b] == pytest.approx([x.item() for x in a], rel=1e-5)
    # by hand, one row: sum_i q_i (log q_i - log p_i), p = softmax(s / T)
    q, p = probs[0][0].double(), torch.softmax(s_start[0].double() / T, dim=-1)
    row0 = (q * (q.log() - p.log())).sum().item()
    one = kd_loss(s_start[:1], probs[0][:1], mask[:1], T, teacher_probabilities=True).item()
    assert one == pytest.approx(row0, rel=1e-5)


# --- end to end: a BERT/WordPiece teacher into a RoBERTa/BPE student, from the CLI

@pytest.fixture(scope="module")
def wordpiece_teacher(synth, tmp_path_factory):
    """A 2 x 64 BERT with a WordPiece tokenizer trained on synth's text, fine-tuned on its train file."""
    d = tmp_path_factory.mktemp("wp-teacher")
    rows = [json.loads(line) for line in __import__("gzip").open(synth["train"], "rt")][1:]
    wp = train_wordpiece([r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]], 1000)
    save_tokenizer(wp, d / "tok")
    cfg = dict(model_type="bert", vocab_size=wp.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=128, max_position_embeddings=160, type_vocab_size=2,
               pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (d / "config.json").write_text(json.dumps(cfg))
    argv = synth_args(synth, d / "model", "--tokenizer", str(d / "tok"), "--init-config", str(d / "config.json"),
                      "--epochs", "3", "--batch-size", "32", "--lr", "2e-3", "--limit", "400")
    train(cli.finetune_args(argv))
    return d / "model"


def distill(synth, teacher, out, *extra):
    return cli.distill_args(synth_args(synth, out, "--teacher", str(teacher), "--init-config", synth["student_cfg"],
                                       "--batch-size", "32", "--lr", "2e-3", "--limit", "200", *extra))


def train_distill_main(argv):
    """train_distill.py's main, loaded by path (the repository root is not on sys.path)."""
    spec = importlib.util.spec_from_file_location("train_distill_script", ROOT / "train_distill.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(argv)


def test_cli_distils_a_bpe_student_from_a_wordpiece_teacher(synth, wordpiece_teacher, tmp_path, capsys):
    main = train_distill_main
    cache = tmp_path / "cache"
    argv = synth_args(synth, tmp_path / "s", "--teacher", str(wordpiece_teacher), "--init-config",
                      synth["student_cfg"], "--epochs", "3", "--batch-size", "32", "--lr", "2e-3", "--limit", "200",
                      "--teacher-cache", str(cache))
    main(argv)
    out = capsys.readouterr().out
    assert "has another tokenizer" in out and "computing teacher probabilities" in out
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    key = json.loads((folder / "key.json").read_text())
    assert key["targets"] == "probabilities" and key["temperature"] == 1.5 and "teacher_tokenizer" in key
    assert (folder / "probabilities.npy").exists() and not (folder / "logits.npy").exists()
    rows = [json.loads(line) for line in (tmp_path / "s" / "log.jsonl").read_text().splitlines() if "kd_loss" in line]
    first, last = np.mean([r["kd_loss"] for r in rows[:3]]), np.mean([r["kd_loss"] for r in rows[-3:]])
    print(f"kd_loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first
    student = load_model(str(tmp_path / "s"))
    assert student.config.family == "roberta" and load_model(str(wordpiece_teacher)).config.family == "bert"
    # the same run again reuses the cache; another temperature is another cache
    main([*argv[:argv.index("--out")], "--out", str(tmp_path / "again"), *argv[argv.index("--out") + 2:],
          "--epochs", "1"])
    assert "teacher probabilities (carried to the student's tokens): reusing" in capsys.readouterr().out
    main([*argv[:argv.index("--out")], "--out", str(tmp_path / "hot"), *argv[argv.index("--out") + 2:],
          "--epochs", "1", "--temperature", "3"])
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_resume_with_carried_probabilities_is_exact(synth, wordpiece_teacher, tmp_path):
    cache = ["--teacher-cache", str(tmp_path / "cache"), "--epochs", "2"]
    full = train(distill(synth, wordpiece_teacher, tmp_path / "full", *cache))
    train(distill(synth, wordpiece_teacher, tmp_path / "cut", *cache, "--stop-after", "3"))
    resumed = train(cli.distill_args(["--resume", str(tmp_path / "cut" / "checkpoint-3"), "--quiet"]))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_what_needs_one_tokenizer_says_so(synth, wordpiece_teacher, tmp_path):
    with pytest.raises(TinyQAError, match="leave out --teacher-on-the-fly"):
        train(distill(synth, wordpiece_teacher, tmp_path / "a", "--teacher-on-the-fly"))
    for stage in ("intermediate", "minilmv2"):
        with pytest.raises(TinyQAError, match=f"the {stage} stage compares their layers position by position"):
            train(cli.distill_args(synth_args(synth, tmp_path / stage, "--stage", stage, "--teacher",
                                              str(wordpiece_teacher), "--init-config", synth["student_cfg"])))


def test_the_carried_cache_computed_in_shards_is_the_one_computed_whole(synth, wordpiece_teacher, tmp_path, monkeypatch):
    """DDP ranks each compute every world-th chunk of questions into the one file: two shards (run here one
    after the other, as ranks 0 and 1) write what one process writes."""
    from tinyqa import distributed, store as store_module
    from tinyqa.store import open_store
    from tinyqa.teacher_cache import TeacherCache, compute_carried, finish, reserve
    monkeypatch.setattr(store_module, "CHUNK_QUESTIONS", 50)  # several chunks in 200 questions
    tok, t_tok = load_tokenizer(synth["tok"]), load_tokenizer(str(wordpiece_teacher))
    fcfg = FeaturizerConfig(128, 32)
    store = open_store(str(tmp_path / "fs"), [synth["train"]], tok, fcfg, limit=200, log=lambda *a: None,
                       progress=False)
    bridge = TokenBridge(tok, t_tok, fcfg, 160)
    teacher = load_model(str(wordpiece_teacher))
    files = {}
    for world in (1, 2):
        tmp = tmp_path / f"world{world}"
        tmp.mkdir()
        reserve(str(tmp / "probabilities.npy"), store.lengths)
        for rank in range(world):
            compute_carried(teacher, store, bridge, str(tmp), 1.5, distributed.Dist(rank, world, "cpu"), 16,
                            __import__("contextlib").nullcontext(), progress=False)
        finish(str(tmp), store.lengths, {"targets": "probabilities"})
        files[world] = TeacherCache(str(tmp), store.lengths)
    idx = list(range(len(store)))
    L = int(store.lengths.max())
    for a, b in zip(files[1].batch(idx, L), files[2].batch(idx, L)):
        assert torch.equal(a, b)
    start, end = files[1].batch(idx, L)
    # every window's carried distributions sum to 1 (float16 storage: to its precision)
    assert torch.allclose(start.sum(-1), torch.ones(len(idx)), atol=5e-3)
    assert torch.allclose(end.sum(-1), torch.ones(len(idx)), atol=5e-3)
    assert pair_layout(t_tok).before != pair_layout(tok).before  # really two tokenizers
