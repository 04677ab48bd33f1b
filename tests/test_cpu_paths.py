"""The CPU inference paths of tinyqa/infer.py: --quantize int8 (dynamic int8 Linears, with oneDNN's kernels where
the CPU has AVX-512 VNNI or AMX) and fp32's prepacked oneDNN Linears (pack_for_cpu, on AVX-512 CPUs)."""
import copy

import pytest
import torch
import torch.ao.quantization

from tinyqa.infer import PackedLinear, pack_for_cpu, quantize_int8
from tinyqa.model import EncoderConfig, EncoderForQA


def small_model():
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=80)
    return EncoderForQA(cfg).eval()


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


def test_int8_logits_are_quantize_dynamics_and_near_fp32():
    """Oracle: quantize_dynamic run by hand with the engine set for it; and fp32 within int8's error. (On a
    model this small every engine gives the same logits, so which engine ran is the spy test's to check.)"""
    model = small_model()
    ids = torch.randint(3, 100, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.inference_mode():
        fp32 = model(ids, mask)
        q = quantize_int8(copy.deepcopy(model))(ids, mask)
        engine = "onednn" if torch.cpu._is_vnni_supported() else torch.backends.quantized.engine
        previous, torch.backends.quantized.engine = torch.backends.quantized.engine, engine
        try:
            by_hand = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        finally:
            torch.backends.quantized.engine = previous
        ref = by_hand(ids, mask)
    assert torch.equal(q.start_logits, ref.start_logits) and torch.equal(q.end_logits, ref.end_logits)
    scale = fp32.start_logits.abs().max()
    assert (q.start_logits - fp32.start_logits).abs().max() < 0.1 * scale
    assert (q.start_logits - fp32.start_logits).abs().max() > 0  # it is int8: not the fp32 model unchanged


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
    ids = torch.randint(3, 100, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
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
