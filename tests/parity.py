"""The parity helpers of the model and family tests: a padded batch of real pairs, and tinyqa's model held
to transformers' (the oracle) on it, logits and every hidden state."""
import torch
from conftest import assert_close


def spread(pairs, n):
    """n pairs spread over the whole set (real SQuAD ones where ../shared is there), not its first few."""
    step = max(1, min(997, len(pairs) // n))
    return pairs[::step][:n]


def padded_batch(tok, pairs, lengths, pad_id):
    """Question/context pairs through the tokenizer's pair template, cut to the given lengths (keeping the
    closing separator) and right-padded: ids, attention mask and token types (B, L)."""
    rows = []
    for (q, c), n in zip(pairs, lengths):
        e = tok.encode(q, c)
        rows.append((e.ids[: n - 1] + e.ids[-1:], e.type_ids[: n - 1] + e.type_ids[-1:]))
    L = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (r, t) in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)], types[i, : len(r)] = torch.tensor(r), 1, torch.tensor(t)
    return ids, mask, types


def check_parity(hf, ours, ids, mask, types=None, atol=1e-4):
    """Start/end logits and every hidden state; returns the largest difference. DeBERTa lets padded query
    rows attend to nothing real (their values are meaningless and differ), so for it only real positions
    are compared."""
    types = torch.zeros_like(ids) if types is None else types
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = ours(ids, mask, types, output_hidden_states=True)
    assert b.start_logits.dtype == torch.float32
    keep = mask.bool() if ours.config.family == "deberta-v2" else torch.ones_like(mask, dtype=torch.bool)
    worst = max(assert_close(b.start_logits[keep], a.start_logits[keep], atol, "start_logits"),
                assert_close(b.end_logits[keep], a.end_logits[keep], atol, "end_logits"))
    assert len(b.hidden_states) == len(a.hidden_states) == ours.config.num_hidden_layers + 1
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states)):
        worst = max(worst, assert_close(x[keep], y[keep], atol, f"hidden state {i}"))
    return worst


def randomize_norms_and_biases_(model, seed=0):
    """Inits leave LayerNorms at (1, 0) and biases at 0; randomise them so that a wrong key mapping (two
    LayerNorms swapped) cannot hide behind identical values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or ".ln" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model
