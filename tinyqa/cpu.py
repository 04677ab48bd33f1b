"""What only CPU inference needs: the batch size that suits the CPU's allocator, fp32 Linears prepacked for
oneDNN, dynamic int8 with q, k and v fused, and where to compute on the real tokens only.

Each is chosen by `QuestionAnswerer.from_pretrained` (so evaluate.py, `answer` and `serve`) where it was
measured to pay (docs/benchmarks.md has the measurements); none changes what the model computes beyond
float rounding (int8 beyond its quantisation), and tests/test_cpu_paths.py holds each to the plain model.
"""
import copy

import torch

from .checks import check_device
from .model import FeedForward, SelfAttention

# On CPU, batches hold at most this many padded tokens (4 windows of 384). Not for memory: the largest
# activation, the feed-forward's (tokens, intermediate_size) float32, then stays under 32 MB (19 MB for
# tinyroberta, 25 MB for roberta-large). glibc's malloc hands freed blocks up to 32 MB back out again, but
# serves bigger ones with a fresh mmap whose every page the kernel must zero on first touch, which costs
# more than the larger matmuls gain (docs/benchmarks.md); matmuls of 1,536 x 768 or more are already at the
# machine's peak. It also lowers peak RSS. GPUs have a caching allocator and want big batches, so there
# only batch_size limits a batch.
CPU_MAX_TOKENS = 1536


def max_tokens_for(device):
    return CPU_MAX_TOKENS if torch.device(device).type == "cpu" else None


@torch.no_grad()
def fuse_qkv(model):
    """Each layer's query, key and value Linears merged, in place, into one Linear(H, 3H) (SelfAttention.qkv):
    one matmul reads the input once instead of three times, and in int8 quantises it once. Not for DeBERTa,
    whose relative position embeddings go through query and key alone. Returns the model (inference only:
    its state_dict no longer has the checkpoint's keys)."""
    if model.config.relative_attention:
        return model
    for m in model.modules():
        if isinstance(m, SelfAttention) and m.qkv is None:
            parts = (m.query, m.key, m.value)
            w = torch.cat([p.weight for p in parts])  # (3H, H): q rows, then k, then v
            m.qkv = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
            m.qkv.weight.copy_(w)
            m.qkv.bias.copy_(torch.cat([p.bias for p in parts]))
            m.query = m.key = m.value = None
    return model


def quantize_int8(model):
    """Dynamic int8 quantisation of every Linear (CPU only): weights stored int8 with one scale per output row,
    activations quantised per batch. Trades a little accuracy for speed; see benchmarks/bench_onnx.py.
    Returns a quantised copy whose q, k and v projections are one Linear (fuse_qkv): each layer's input is
    then quantised once, not three times. Per-row scales keep q, k and v each on its own scale inside it.
    The kernels: PyTorch's default int8 engine (x86, fbgemm's) on most CPUs, but oneDNN's where the CPU has
    AVX-512 VNNI or AMX, whose int8 matmul instructions it uses and fbgemm does not; on AVX2 alone oneDNN's
    is the slower one. The weights are packed for the engine chosen here, and their forward runs its
    kernels whatever the global engine is later."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    p = next(model.parameters())
    check_device(p.device, p.dtype, "int8")
    previous = torch.backends.quantized.engine
    if "onednn" in torch.backends.quantized.supported_engines and getattr(torch.cpu, "_is_vnni_supported",
                                                                          lambda: False)():
        torch.backends.quantized.engine = "onednn"
    try:
        return quantize_dynamic(fuse_qkv(copy.deepcopy(model)), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8, inplace=True)
    finally:
        torch.backends.quantized.engine = previous


class PackedLinear(torch.nn.Module):
    """An nn.Linear for fp32 CPU inference through oneDNN: the weight reordered once into oneDNN's blocked
    layout, the bias (and, for the feed-forward's first Linear, the GELU) applied inside the matmul. nn.Linear
    runs MKL's addmm, which first copies the bias into every output row, and GELU is then one more pass over
    the (tokens, 3072) activation. The weight is no longer an nn.Parameter: a packed model is for inference
    only (train and save the model you loaded; pack a copy)."""

    def __init__(self, linear: torch.nn.Linear, gelu=False):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)  # oneDNN layout
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self.post_op, self.algorithm = ("gelu", "none") if gelu else ("none", "")  # "none": erf GELU, not tanh

    def forward(self, x):  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.post_op, [], self.algorithm)


def packing_pays() -> bool:
    """Where PackedLinear was measured faster than nn.Linear: CPUs with AVX-512. On AVX2 alone oneDNN's
    Linear was slower than MKL's (docs/benchmarks.md)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


@torch.no_grad()
def pack_for_cpu(model, force=False):
    """The model's Linears replaced by PackedLinear, in place, when it is fp32 on the CPU and packing pays
    here (or `force`); the feed-forward's GELU moves into its first Linear. Returns the model."""
    p = next(model.parameters())
    has_linears = any(type(m) is torch.nn.Linear for m in model.modules())  # not int8 ones (quantize_int8)
    if not has_linears or p.device.type != "cpu" or p.dtype != torch.float32 or not (force or packing_pays()):
        return model
    for module in list(model.modules()):
        if isinstance(module, FeedForward) and type(module.up) is torch.nn.Linear:
            module.up, module.act = PackedLinear(module.up, gelu=True), torch.nn.Identity()
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, PackedLinear(child))
    return model


def unpadding_pays(model, device) -> bool:
    """Where run_model computes on the real tokens only (EncoderForQA.forward_unpadded): CPU inference, where
    every padded token costs as much as a real one, so the gain is the batch's share of padding. Not on GPUs,
    where one SDPA call per window length would cost a kernel launch each, nor for DeBERTa, whose relative
    position bias is built for the padded length."""
    return torch.device(device).type == "cpu" and not model.training and not model.config.relative_attention
