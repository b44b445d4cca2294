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
- The quantized engine is chosen per CPU (`device.int8_engine`). Where two engines each win a
  range of row counts (AMX: fbgemm for a few rows, oneDNN for many), every linear holds its
  int8 weight packed for both and picks per call (`SplitInt8Linear`): the same int8 weights
  and per-call activation quantization, only the kernel differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from serve_app.models.device import Int8Engines


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


class SplitInt8Linear(nn.Module):
    """A dynamic int8 linear whose weight is packed for two quantized engines: `few` runs calls
    of fewer than `min_rows` rows (a decode step of one or two users), `many` the rest (bigger
    batches, prefills). Both compute `linear_dynamic` as `DynamicQuantizedLinear` does: the
    same int8 weight and per-channel scales, activations quantized per call."""

    def __init__(self, linear: nn.Module, engines: Int8Engines) -> None:
        """`linear`: a `DynamicQuantizedLinear` packed under `engines.few_rows`."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.min_rows = engines.min_rows
        self.engines = (engines.few_rows, engines.many_rows)
        weight, bias = linear._weight_bias()
        self._few = linear._packed_params._packed_params  # packed under `few_rows` already
        with _engine(engines.many_rows):
            self._many = torch.ops.quantized.linear_prepack(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        packed = self._many if rows >= self.min_rows else self._few
        # reduce_range as DynamicQuantizedLinear passes it, so every engine computes the same.
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True)

    def _weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.ops.quantized.linear_unpack(self._few)

    def extra_repr(self) -> str:
        few, many = self.engines
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qint8, "
            f"{few} <{self.min_rows} rows, {many} >={self.min_rows} rows"
        )


@contextmanager
def _engine(name: str) -> Iterator[None]:
    """`torch.backends.quantized.engine` set to `name` while weights are packed for it (a
    packed weight keeps its engine: `linear_dynamic` runs whichever it is handed)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def quantize_int8(model: nn.Module, engines: Int8Engines) -> nn.Module:
    """Quantize `model` (a float32 transformers GPT-2, eval mode) in place; returns it."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D

    from serve_app.generation.kernels import replace_modules

    supported = torch.backends.quantized.supported_engines
    if engines.split and not {engines.few_rows, engines.many_rows} <= set(supported):
        engines = type(engines)(engines.few_rows, engines.few_rows)
    if engines.few_rows in supported:
        torch.backends.quantized.engine = engines.few_rows

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
    if engines.split:
        replace_modules(
            model,
            lambda m: (
                SplitInt8Linear(m, engines) if isinstance(m, DynamicQuantizedLinear) else None
            ),
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
    """Bytes of the weights `model` keeps: parameters, buffers and packed int8 weights (twice
    for a `SplitInt8Linear`, which holds a packing per engine)."""
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams

    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for module in model.modules():
        # A DynamicQuantizedLinear's packing is its LinearPackedParams child: count it there.
        packings = {LinearPackedParams: 1, SplitInt8Linear: 2}.get(type(module), 0)
        if packings:
            weight, bias = module._weight_bias()
            size = weight.numel() * weight.element_size()
            size += 0 if bias is None else bias.numel() * bias.element_size()
            total += size * packings
    return total
