"""`python -m tinyqa export --onnx DIR`: ONNX Runtime runs the exported model with tinyqa's logits, every family."""
import json

import pytest
import torch
from conftest import ROOT  # noqa: F401  (tests/ on the path)

from tinyqa import EncoderConfig, EncoderForQA, save_pretrained
from tinyqa.export import example_batch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime checks the export (pip install -e '.[test]')")

# pad_token_id 1 everywhere: the test's byte-level BPE pads with id 1, and the export refuses a tokenizer
# whose pad id is not the model's (it would not be the model's own tokenizer)
FAMILIES = {
    "roberta": dict(model_type="roberta", vocab_size=300, max_position_embeddings=130),
    "bert": dict(model_type="bert", vocab_size=300, max_position_embeddings=128, pad_token_id=1),
    "electra": dict(model_type="electra", vocab_size=300, max_position_embeddings=128, embedding_size=32, pad_token_id=1),
    "deberta-v2": dict(model_type="deberta-v2", vocab_size=300, max_position_embeddings=128, pad_token_id=1),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_runtime_gives_tinyqas_logits(family, tmp_path, capsys):
    from tinyqa.__main__ import main
    from tinyqa.synthetic import train_tokenizer
    torch.manual_seed(0)
    model = EncoderForQA(EncoderConfig(**FAMILIES[family], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128)).eval()
    with torch.no_grad():  # LayerNorms and biases off their (1, 0) init, so a dropped term would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    tok = train_tokenizer(["a few words of text for a tiny vocabulary"] * 20, 300)
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    main(["export", "--model", str(tmp_path / "ckpt"), "--onnx", str(tmp_path / "onnx")])
    assert "ONNX Runtime matches tinyqa" in capsys.readouterr().out
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["model_type"] == FAMILIES[family]["model_type"]
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == ["input_ids", "attention_mask"] + (["token_type_ids"] if family in ("bert", "electra") else [])
    # another batch shape than the one traced: both axes are dynamic
    ids, mask, types = example_batch(model.config, lengths=(100, 64, 3, 77), seed=5)
    feed = {k: v.numpy() for k, v in zip(["input_ids", "attention_mask", "token_type_ids"], (ids, mask, types))}
    start, end = sess.run(None, {n: feed[n] for n in names})
    with torch.no_grad():
        ref = model(ids, mask, types)
    keep = mask.bool()
    for got, want in ((start, ref.start_logits), (end, ref.end_logits)):
        assert (torch.from_numpy(got) - want)[keep].abs().max().item() <= 1e-4


def test_export_refuses_a_file_as_folder(tmp_path):
    from tinyqa.__main__ import main
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(tmp_path), "--onnx", str(tmp_path / "f")])
    assert e.value.code == 2
