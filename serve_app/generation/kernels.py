"""oneDNN matmuls with pre-packed weights for a model's linear layers (float32 and bfloat16).

PyTorch's CPU build sends a float32 `linear` to MKL. On this project's machine (AMD EPYC with
AVX-512) MKL runs its AVX2 code, while oneDNN, which PyTorch also ships, uses AVX-512 and can
hold each weight pre-packed in the blocked layout its kernel reads. Measured on the 2-core box,
one float32 GPT-2 (124M) forward pass's linear layers, MKL vs oneDNN pre-packed: 15.9 vs 8.2 ms
at 1 row, 76.4 vs 26.7 ms at 32 rows, 761 vs 337 ms for a prefill of 800 tokens; bfloat16 at
32 rows: 18.1 vs 13.4 ms. Both are plain IEEE float32 (or bfloat16) arithmetic; only the
blocking and the summation order differ, as they do between MKL's own code paths.

`use_decode_attention` makes a model's single-token decode steps compute attention with two
plain matmuls and a float32 softmax, and leaves prefills (many query tokens) to SDPA's flash
kernel, which never materialises the [query, key] score matrix. For one query token per row,
SDPA's CPU flash kernel costs more than the whole computation: per layer at 32 rows and 90
cached tokens, 2.05 vs 0.31 ms in bfloat16 and 0.31 vs 0.27 ms in float32.

`pack_linears` swaps GPT-2's `Conv1D` projections and the LM head for `PackedLinear` modules.
The op is the one `torch.compile` (inductor) emits for the same purpose,
`torch.ops.mkldnn._linear_pointwise` on a weight from `torch.ops.mkldnn._reorder_linear_weight`.
It is internal to PyTorch, so `packing_available()` checks it on a probe and the model is left
as it is when the op is missing or disagrees with `torch.nn.functional.linear`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("ray.serve").getChild(__name__)

_PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """`y = x @ weight.T + bias` through oneDNN, with `weight` pre-packed once at load."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.dtype = weight.dtype
        # Buffers, not parameters: an opaque oneDNN tensor has no storage for autograd or
        # state_dict; the packed model is for inference only.
        self.register_buffer("packed", _pack(weight.detach().contiguous()), persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().clone(), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


_checked: dict[torch.dtype, bool] = {}


def packing_available(dtype: torch.dtype) -> bool:
    """oneDNN is built in, the ops exist, and a packed linear agrees with `F.linear`."""
    if dtype not in _PACKABLE:
        return False
    if dtype not in _checked:
        _checked[dtype] = _probe(dtype)
    return _checked[dtype]


def native_bfloat16() -> bool:
    """oneDNN has bfloat16 kernels for this CPU (AVX-512 and up); without them bfloat16
    matmuls run on generic code, far slower than float32."""
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except Exception:  # an internal op: missing in this torch build
        return False


def _probe(dtype: torch.dtype) -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not native_bfloat16():
            return False
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 40, generator=gen).to(dtype)
        bias = torch.randn(48, generator=gen).to(dtype)
        x = torch.randn(3, 5, 40, generator=gen).to(dtype)
        with torch.inference_mode():
            got = PackedLinear(weight, bias)(x)
            want = nn.functional.linear(x.float(), weight.float(), bias.float())
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return got.shape == want.shape and torch.allclose(got.float(), want, atol=tol, rtol=tol)
    except Exception as exc:  # an internal op: missing or changed in this torch build
        logger.warning("oneDNN packed linear unavailable for %s: %r", dtype, exc)
        return False


ATTENTION = "serve_cpu_decode"
"""The attention implementation name registered with transformers (and its mask builder)."""


def _decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """transformers attention interface: [rows, heads, q, dim] in, [rows, q, heads, dim] out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or dropout:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:  # from `sdpa_mask` (registered below): bool, True = attend
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2), None


def use_decode_attention(model: nn.Module) -> None:
    """Switch `model` (a transformers model using the sdpa interface) to `_decode_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


def pack_linears(model: nn.Module) -> int:
    """Replace every GPT-2 `Conv1D` and `nn.Linear` of `model` (LM head included) with a
    `PackedLinear` holding the same weights. Returns how many were replaced: 0 when the
    model's dtype cannot be packed on this machine (it is then left untouched)."""
    from transformers.pytorch_utils import Conv1D

    dtype = next(model.parameters()).dtype
    if not packing_available(dtype):
        return 0

    def packed(child: nn.Module) -> nn.Module | None:
        if isinstance(child, Conv1D):  # y = x @ weight + bias, weight [in, out]
            return PackedLinear(child.weight.t(), child.bias)
        if type(child) is nn.Linear:
            return PackedLinear(child.weight, child.bias)
        return None

    return replace_modules(model, packed)


def replace_modules(model: nn.Module, replacement) -> int:
    """Swap every submodule for which `replacement(child)` returns a module; returns how many.
    All replacements are made first, so the walk never sees a module it has just swapped in."""
    swaps = [
        (parent, name, new)
        for parent in model.modules()
        for name, child in parent.named_children()
        if (new := replacement(child)) is not None
    ]
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)
