"""int8 GPT-2 on any x86 CPU: int8 weights, activations quantized per step.

What `quantize_int8` does to a loaded float32 GPT-2, and why (profiled on the 124M stand-in,
decode steps of 32 rows on 2 AVX2 cores; `docs/benchmarks.md` has the end-to-end figures):

- Every projection (transformers' `Conv1D`, a transposed Linear that `quantize_dynamic` does
  not know) becomes an `nn.Linear`, and every `nn.Linear`, the LM head included, a dynamic
  int8 linear with per-output-channel weight scales. The LM head is tied to the token
  embedding in GPT-2: it is quantized from the shared weight, and the embedding gets its own
  int8 copy (`Int8Embedding`), so no float32 copy of the 50257x768 matrix stays resident.
- GPT-2's `gelu_new` is six elementwise passes over the 3072-wide MLP activation; PyTorch's
  `gelu(approximate="tanh")` is the same formula in one (a step: 78 -> 60 ms).
- The quantized engine is chosen per CPU (`device.int8_engine`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one float32 scale each (symmetric)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def quantize_int8(model: nn.Module, engine: str) -> nn.Module:
    """Quantize `model` (a float32 transformers GPT-2, eval mode) in place; returns it."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D

    from serve_app.generation.kernels import replace_modules

    if engine in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = engine

    def rewritten(child: nn.Module) -> nn.Module | None:
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.nx, child.nf, device=child.weight.device)
            linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), False)
            linear.bias = nn.Parameter(child.bias.detach().clone(), False)  # see _own_storage
            return linear
        if isinstance(child, NewGELUActivation):
            return nn.GELU(approximate="tanh")
        return None

    replace_modules(model, rewritten)
    embedding = model.get_input_embeddings()
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not a dependency) but works.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        quantize_dynamic(
            model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    model.set_input_embeddings(Int8Embedding(embedding.weight))
    del embedding
    _own_storage(model)
    return model


def _own_storage(model: nn.Module) -> None:
    """Copy what float32 tensors remain (layer norms, biases, position embeddings: 3 MB) out
    of the checkpoint and hand the freed float32 weights back to the OS.

    transformers maps the safetensors file and its tensors point into that mapping: while one
    of them lives, the whole file's pages (500 MB for gpt2) stay resident. Freed heap memory
    likewise stays in glibc's arenas until `malloc_trim`. Measured on gpt2 (process RSS):
    1428 MB after quantizing, 599 MB with both released (float32: 1398 MB)."""
    import ctypes
    import gc

    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is freed, just not returned yet
        pass


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the weights `model` keeps: parameters, buffers and packed int8 weights."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for module in model.modules():
        if hasattr(module, "_weight_bias") and isinstance(module, nn.Module):
            weight, bias = module._weight_bias()
            total += weight.numel() * weight.element_size()
            total += 0 if bias is None else bias.numel() * bias.element_size()
    return total
