"""--quantize int8 (tinyqa.infer.quantize_int8): dynamic int8 Linears, with oneDNN's kernels where the CPU has
AVX-512 VNNI or AMX (2.7x PyTorch's default int8 engine on a Sapphire Rapids; 2x slower on AVX2 alone)."""
import copy

import pytest
import torch
import torch.ao.quantization

from tinyqa.infer import quantize_int8
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


def test_int8_logits_are_the_engines_own_and_near_fp32():
    """Oracle: quantize_dynamic run by hand with the engine set for it; and fp32 within int8's error."""
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
