"""The CPU inference paths of tinyqa/infer.py: --quantize int8 (dynamic int8 Linears, with oneDNN's kernels where
the CPU has AVX-512 VNNI or AMX), fp32's prepacked oneDNN Linears (pack_for_cpu, on AVX-512 CPUs) and the forward
on real tokens only (EncoderForQA.forward_unpadded, run_model's CPU path)."""
import copy

import pytest
import torch
import torch.ao.quantization

from tinyqa.cpu import PackedLinear, fuse_qkv, pack_for_cpu, quantize_int8, unpadding_pays

from tinyqa.model import EncoderConfig, EncoderForQA


def small_model():
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=80)
    return EncoderForQA(cfg).eval()


# a small DeBERTa-v3 (relative attention): the settings that differ from BERT's, as in test_family.py
DEBERTA = dict(model_type="deberta-v2", relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
               position_buckets=256, max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
               type_vocab_size=0, pad_token_id=0)


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_engine_is_chosen_by_the_cpu_and_the_global_engine_is_left_alone(monkeypatch, vnni):
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no oneDNN int8 engine")
    seen = []
    real = torch.ao.quantization.quantize_dynamic

    def spy(*a, **k):
        seen.append(torch.backends.quantized.engine)
        return real(*a, **k)
    monkeypatch.setattr(torch.ao.quantization, "quantize_dynamic", spy)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni)
    before = torch.backends.quantized.engine
    quantize_int8(small_model())
    assert seen == ["onednn" if vnni else before]
    assert torch.backends.quantized.engine == before


def batch():
    ids = torch.randint(3, 100, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    return ids, mask


def test_fused_qkv_gives_the_models_logits():
    """fuse_qkv: one Linear(H, 3H) per layer in place of query, key and value, the logits the unfused model's
    (oracle: the unfused model, itself held to transformers by the parity tests); DeBERTa left as it is."""
    model = small_model()
    with torch.no_grad():  # biases away from zero, so a bias put in the wrong third would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = fuse_qkv(copy.deepcopy(model))
    for layer in fused.encoder.layers:
        assert layer.attn.qkv.weight.shape == (3 * 64, 64) and layer.attn.query is None and layer.attn.value is None
    ids, mask = batch()
    with torch.inference_mode():
        a, b = model(ids, mask), fused(ids, mask)
    for x, y in ((a.start_logits, b.start_logits), (a.end_logits, b.end_logits)):
        assert (x - y).abs().max() < 1e-5, (x - y).abs().max()  # rounding only (q and k biases swapped: 4e-4)
    cfg = EncoderConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, **DEBERTA)
    deberta = EncoderForQA(cfg)
    assert fuse_qkv(deberta).encoder.layers[0].attn.qkv is None  # its position embeddings need query and key


def test_int8_weights_are_fused_per_row_and_the_logits_near_fp32():
    """quantize_int8 quantises a fused copy (the model given is left as it was) with one scale per weight row:
    oracle, each row dequantised within half its own step (absmax/127) of the fp32 row. The query rows are
    made 100x smaller than key's and value's, so one scale for the whole (3H, H) weight would fail that."""
    model = small_model()
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.attn.query.weight.mul_(0.01)
    ids, mask = batch()
    with torch.inference_mode():
        fp32 = model(ids, mask)
        q8 = quantize_int8(model)
        int8 = q8(ids, mask)
    assert model.encoder.layers[0].attn.qkv is None  # the caller's model is not fused
    for ours, layer in zip(q8.encoder.layers, model.encoder.layers):
        w = torch.cat([layer.attn.query.weight, layer.attn.key.weight, layer.attn.value.weight])
        step = w.abs().amax(dim=1, keepdim=True) / 127
        assert ((ours.attn.qkv.weight().dequantize() - w).abs() <= step / 2 + 1e-7).all()
    scale = fp32.start_logits.abs().max()
    assert (int8.start_logits - fp32.start_logits).abs().max() < 0.1 * scale
    assert (int8.start_logits - fp32.start_logits).abs().max() > 0  # it is int8: not the fp32 model unchanged


def test_packed_linears_give_the_models_logits():
    """pack_for_cpu(force=True), whatever this CPU: every Linear becomes a PackedLinear, the feed-forward's
    GELU moves into its first one, and the logits stay the unpacked model's (which the parity tests hold to
    transformers') within 1e-5, padding included."""
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=100, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=384, max_position_embeddings=80)
    model = EncoderForQA(cfg).eval()
    with torch.no_grad():  # away from zero biases, so a dropped bias or GELU would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask = batch()
    packed = pack_for_cpu(copy.deepcopy(model), force=True)
    assert not [m for m in packed.modules() if type(m) is torch.nn.Linear]
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 6 + 1
    assert all(type(layer.ffn.act) is torch.nn.Identity for layer in packed.encoder.layers)
    with torch.inference_mode():
        a, b = model(ids, mask), packed(ids, mask)
    for x, y in ((a.start_logits, b.start_logits), (a.end_logits, b.end_logits)):
        assert (x - y).abs().max() < 1e-5, (x - y).abs().max()


def test_packing_is_left_out_where_it_does_not_pay_or_apply(monkeypatch):
    model = small_model()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # slower there (measured)
    assert pack_for_cpu(model) is model and type(model.qa_outputs) is torch.nn.Linear
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    bf16 = pack_for_cpu(copy.deepcopy(model).to(torch.bfloat16))
    assert type(bf16.qa_outputs) is torch.nn.Linear  # fp32 only
    int8 = pack_for_cpu(quantize_int8(copy.deepcopy(model)))
    assert not [m for m in int8.modules() if isinstance(m, PackedLinear)]  # int8 Linears stay int8
    if torch.backends.mkldnn.is_available():
        assert isinstance(pack_for_cpu(model).qa_outputs, PackedLinear)


@pytest.mark.parametrize("family", ["roberta", "bert", "electra"])
def test_unpadded_forward_gives_the_padded_models_logits(family):
    """EncoderForQA.forward_unpadded: the batch's real tokens laid end to end, attention per window (runs of equal lengths
    in one call), and each window's logits those of the padded forward (oracle: the model's own forward, which
    the parity tests hold to transformers') within 1e-5. Attention leaking across windows, a window's tokens
    in the wrong place or a dropped layer step would each move them by far more. Also with q|k|v fused."""
    torch.manual_seed(0)
    cfg = EncoderConfig(model_type=family, vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=80, embedding_size=32 if family == "electra" else None)
    model = EncoderForQA(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lengths = [40, 40, 33, 33, 33, 12, 5]  # length-sorted as run_model's batches are, with runs of equal lengths
    ids = torch.randint(3, 100, (len(lengths), 40))
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        types[row, n // 2:n] = 1
        ids[row, n:] = cfg.pad_token_id
    for m in (model, fuse_qkv(copy.deepcopy(model))):
        with torch.inference_mode():
            padded = m(ids, mask, types)
            starts, ends = m.forward_unpadded(ids, mask, types)
        assert [len(s) for s in starts] == [len(e) for e in ends] == lengths
        for row, n in enumerate(lengths):
            for ours, ref in ((starts[row], padded.start_logits[row, :n]), (ends[row], padded.end_logits[row, :n])):
                assert (ours - ref).abs().max() < 1e-5, (row, (ours - ref).abs().max())


def test_unpadding_is_for_cpu_inference_without_relative_attention():
    model = small_model()
    assert unpadding_pays(model, "cpu") and unpadding_pays(model, torch.device("cpu"))
    assert not unpadding_pays(model, "cuda")  # one SDPA call per window length: a kernel launch each
    assert not unpadding_pays(copy.deepcopy(model).train(), "cpu")  # training's eval mode only (no dropout here)
    cfg = EncoderConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, **DEBERTA)
    assert not unpadding_pays(EncoderForQA(cfg).eval(), "cpu")  # its position bias is built for the padded length
