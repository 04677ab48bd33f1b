"""A small random QA checkpoint with a tokenizer trained on generated text: no ../shared, no download."""
import torch

from tinyqa import EncoderConfig, EncoderForQA, save_pretrained
from tinyqa.synthetic import make_dataset, train_tokenizer


def tiny_checkpoint(directory, seed=3):
    """Writes the checkpoint to `directory`; returns the generated MRQA rows whose text trained the tokenizer."""
    rows = make_dataset(40, seed=seed)
    texts = [r["context"] for r in rows] + [q["question"] for r in rows for q in r["qas"]]
    tok = train_tokenizer(texts, vocab_size=800)
    torch.manual_seed(0)
    model = EncoderForQA(EncoderConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64))
    with torch.no_grad():  # spread the QA logits so that different questions get different answers
        model.qa_outputs.weight.mul_(100.0)
    save_pretrained(model, directory, tokenizer=tok)
    return rows
