"""The hand-written RoBERTa QA model against transformers' RobertaForQuestionAnswering (the oracle).

Every parity test runs on generated text with a generated tokenizer (see conftest.py), and again on SQuAD
dev with the real RoBERTa tokenizer where ../shared/data is there; the configs are written out here."""
import json
import os

import pytest
import torch
from conftest import assert_close
import parity
from parity import check_parity, randomize_norms_and_biases_

import tinyqa
from tinyqa import EncoderConfig, load_model, load_tokenizer, save_pretrained

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=50265, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
# The published configs' shapes (deepset/tinyroberta-squad2 and roberta-large's config.json).
TINYROBERTA = dict(SMALL, hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072,
                   bos_token_id=0, eos_token_id=2)
ROBERTA_LARGE = dict(TINYROBERTA, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def hf_model(config_dict, seed=0):
    torch.manual_seed(seed)
    return randomize_norms_and_biases_(transformers.RobertaForQuestionAnswering(transformers.RobertaConfig(**config_dict)).eval(),
                                       seed)


def padded_batch(tokenizer_dir, text_pairs, lengths):
    """The longest question/context pairs, truncated to the given lengths and right-padded with <pad>."""
    longest = sorted(text_pairs, key=lambda p: (-len(p[1]), p[0]))[::7]
    ids, mask, _ = parity.padded_batch(load_tokenizer(str(tokenizer_dir)), longest, lengths, pad_id=1)
    return ids, mask


def test_parity_small_config(tmp_path, tokenizer_dir, text_pairs):
    hf = hf_model(SMALL)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    ids, mask = padded_batch(tokenizer_dir, text_pairs, [384, 260, 131, 40, 17])
    check_parity(hf, ours, ids, mask)


def test_parity_tinyroberta_config(tmp_path, tokenizer_dir, text_pairs):
    hf = hf_model(TINYROBERTA)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    ids, mask = padded_batch(tokenizer_dir, text_pairs, [384, 222, 95, 31])
    check_parity(hf, ours, ids, mask)


@pytest.mark.slow
def test_parity_roberta_large_config(tmp_path, generated):
    """The full size once, on generated text (the small configs cover the real tokenizer's ids)."""
    hf = hf_model(ROBERTA_LARGE)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    ids, mask = padded_batch(generated["tokenizer"], generated["pairs"], [300, 120])
    check_parity(hf, ours, ids, mask)


def test_round_trip_through_transformers(tmp_path, tokenizer_dir, text_pairs):
    torch.manual_seed(1)
    ours = tinyqa.EncoderForQA(EncoderConfig(**SMALL)).eval()
    save_pretrained(ours, tmp_path, tokenizer=load_tokenizer(str(tokenizer_dir)))
    hf, info = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == "RobertaForQuestionAnswering"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = padded_batch(tokenizer_dir, text_pairs, [200, 64])
    check_parity(hf.eval(), ours, ids, mask, atol=1e-5)
    # and tinyqa reads back what it wrote, bit for bit
    again = load_model(str(tmp_path))
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # the tokenizer written beside the weights is usable by transformers too
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok("Who?", "Me.")["input_ids"] == load_tokenizer(str(tmp_path)).encode("Who?", "Me.").ids


def test_pytorch_model_bin_and_bare_encoder_keys(tmp_path, tokenizer_dir, text_pairs):
    """pytorch_model.bin is read (weights_only) and keys without the 'roberta.' prefix are accepted."""
    hf = hf_model(SMALL, seed=3)
    state = {k.removeprefix("roberta."): v for k, v in hf.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    ours = load_model(str(tmp_path))
    ids, mask = padded_batch(tokenizer_dir, text_pairs, [100, 50])
    check_parity(hf, ours, ids, mask)


def test_base_lm_checkpoint_gets_fresh_head(tmp_path, capsys, tokenizer_dir, text_pairs):
    torch.manual_seed(4)
    lm = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**SMALL)).eval()
    lm.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    assert "no QA head" in capsys.readouterr().err  # a notice: stderr, so JSON on stdout stays clean
    ids, mask = padded_batch(tokenizer_dir, text_pairs, [80, 30])
    with torch.no_grad():
        a = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        b = ours(ids, mask, output_hidden_states=True).hidden_states
    for x, y in zip(b, a):
        assert_close(x, y, 1e-4, "encoder of a base LM checkpoint")
    assert ours.qa_outputs.weight.abs().sum() > 0  # initialised, not left at zero


def _tiny_checkpoint(tmp_path):
    hf = hf_model(dict(SMALL, vocab_size=100, max_position_embeddings=40), seed=5)
    hf.save_pretrained(tmp_path)
    return hf


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    _tiny_checkpoint(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(tinyqa.TinyQAError, match="truncated"):
        load_model(str(tmp_path))


def test_missing_key_and_wrong_shape_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file
    _tiny_checkpoint(tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    del state["roberta.encoder.layer.1.attention.self.key.weight"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(tinyqa.TinyQAError, match=r"missing keys.*layer\.1\.attention\.self\.key\.weight"):
        load_model(str(tmp_path))
    state["roberta.encoder.layer.1.attention.self.key.weight"] = torch.zeros(64, 63)
    state["roberta.encoder.layer.0.extra.weight"] = torch.zeros(3)
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(tinyqa.TinyQAError) as e:
        load_model(str(tmp_path))
    assert "(64, 63)" in str(e.value) and "(64, 64)" in str(e.value)
    assert "unexpected keys" in str(e.value) and "layer.0.extra.weight" in str(e.value)


def test_unknown_alias_and_bad_config(tmp_path):
    with pytest.raises(tinyqa.TinyQAError, match="unknown model 'tinyrobert-mrqa'.*tinyroberta-mrqa"):
        load_model("tinyrobert-mrqa")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "hidden_act": "relu"}))
    with pytest.raises(tinyqa.TinyQAError, match="hidden_act='relu' is not supported"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="position_embedding_type"):
        EncoderConfig(position_embedding_type="relative_key")


def test_hub_id_offline_says_what_to_do(tmp_path):
    """With no network and an empty HF cache a hub id fails with one line that names the way out."""
    import subprocess
    import sys
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-c", "import tinyqa; tinyqa.load_model('tinyroberta-mrqa')"],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "VMware/tinyroberta-mrqa" in last and "local directory" in last, r.stderr


def test_tokenizer_matches_roberta_fast(tokenizer_dir, text_pairs, tmp_path):
    """ids and offsets of every pair, from tokenizer.json and from vocab.json + merges.txt alone, equal those of
    transformers' RobertaTokenizerFast (which builds RoBERTa's pipeline itself from the two files)."""
    only_vm = tmp_path / "vm"
    only_vm.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (only_vm / name).write_bytes((tokenizer_dir / name).read_bytes())
    with_json = tokenizer_dir
    if not (tokenizer_dir / "tokenizer.json").exists():  # generated: let transformers write the tokenizer.json
        transformers.RobertaTokenizerFast.from_pretrained(str(only_vm)).save_pretrained(str(tmp_path / "tj"))
        with_json = tmp_path / "tj"
    hf_tok = transformers.RobertaTokenizerFast.from_pretrained(str(with_json))
    expected = hf_tok([q for q, _ in text_pairs], [c for _, c in text_pairs], return_offsets_mapping=True)
    for source in (str(with_json), str(only_vm)):
        tok = load_tokenizer(source)
        got = tok.encode_batch(text_pairs)
        assert len(got) == len(expected["input_ids"]) == len(text_pairs)
        bad = [i for i, e in enumerate(got) if e.ids != expected["input_ids"][i]
               or [tuple(o) for o in e.offsets] != [tuple(o) for o in expected["offset_mapping"][i]]]
        assert not bad, f"{source}: {len(bad)} pairs differ, first {bad[:5]}"


@pytest.mark.skipif(not os.environ.get("TINYQA_CHECKPOINT"),
                    reason="set TINYQA_CHECKPOINT to a local directory of a published checkpoint")
def test_real_checkpoint_parity(tokenizer_dir, text_pairs):
    path = os.environ["TINYQA_CHECKPOINT"]
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval()
    ours = load_model(path)
    ids, mask = padded_batch(tokenizer_dir, text_pairs, [384, 200, 64])
    check_parity(hf, ours, ids, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_parity_fp32_and_half(tmp_path, tokenizer_dir, text_pairs):
    hf = hf_model(TINYROBERTA)
    hf.save_pretrained(tmp_path)
    ids, mask = padded_batch(tokenizer_dir, text_pairs, [384, 222, 95, 31])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
    ids, mask = ids.cuda(), mask.cuda()
    for dtype, atol in ((torch.float32, 1e-3), (torch.bfloat16, 0.25), (torch.float16, 0.05)):
        ours = load_model(str(tmp_path), device="cuda", dtype=dtype)
        with torch.no_grad():
            out = ours(ids, mask)
        valid = mask.bool().cpu()  # padded positions carry no meaning in reduced precision
        assert_close(out.start_logits.cpu()[valid], ref.start_logits[valid], atol, f"cuda {dtype} start")
        assert_close(out.end_logits.cpu()[valid], ref.end_logits[valid], atol, f"cuda {dtype} end")


def test_flops_per_token_matches_torch_flop_counter():
    """The FLOP count the benchmarks divide by equals torch's own FlopCounterMode over a real forward (with
    SDPA's math backend, whose matmuls the counter sees), for windows of two lengths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from tinyqa.model import EncoderForQA, flops_per_token
    cfg = EncoderConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    model = EncoderForQA(cfg).eval()
    for L in (7, 37):
        ids = torch.randint(3, 100, (2, L))
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(ids, torch.ones_like(ids))
        assert counter.get_total_flops() == 2 * L * flops_per_token(cfg, L)
