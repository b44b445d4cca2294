"""int8 GPT-2 on any x86 CPU: int8 weights, activations quantized per step.

What `quantize_int8` does to a loaded float32 GPT-2, and why (profiled on the 124M stand-in,
decode steps of 32 rows on 2 AVX2 cores; `docs/benchmarks.md` has the end-to-end figures):

- Every projection (transformers' `Conv1D`, a transposed Linear that `quantize_dynamic` does
  not know) becomes an `nn.Linear`, and every `nn.Linear`, the LM head included, a dynamic
  int8 linear with per-output-channel weight scales. The LM head is tied to the token
  embedding in GPT-2: it is quantized from the shared weight, and the embedding gets its own
  int8 copy (`Int8Embedding`), so no float32 copy of the 50257x768 matrix stays resident.
- GPT-2's `gelu_new` (the tanh approximation of GELU) is six elementwise passes over the
  3072-wide MLP activation; PyTorch's exact (erf) `gelu` is one, 3-4x faster than its own tanh
  form (32x3072, 2 threads: 37 vs 121 us capped at AVX2, 20 vs 65 us on AVX-512; about 5% of
  an AVX2 decode step of 32 rows). The two differ by at most 4.8e-4, which the int8 path
  cannot see: the next linear quantizes that activation to 7 bits, steps of range / 127.
- The quantized engine is chosen per CPU (`device.int8_engine`). Where two engines each win a
  range of row counts (AMX: fbgemm for a few rows, oneDNN for many), every linear holds its
  int8 weight packed for both and picks per call (`SplitInt8Linear`): the same int8 weights
  and per-call activation quantization, only the kernel differs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from serve_app.models.device import Int8Engines

logger = logging.getLogger("ray.serve").getChild(__name__)


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
    """A dynamic int8 linear with its weight packed twice: for fbgemm, which runs calls of fewer
    than `min_rows` rows (a decode step of one or two users), and for oneDNN's int8 matmul
    (AMX where the CPU has it), which runs the rest (bigger batches, prefills).

    Both compute what `DynamicQuantizedLinear` does: the same int8 weight and per-channel
    scales, the activation quantized per call to uint8 with `reduce_range` (7 bits), float32
    out. The oneDNN side is `torch.ops.onednn.qlinear_pointwise`, the op inductor emits for
    x86 int8, on an opaque packed weight: the quantized engine `onednn` (`linear_dynamic`)
    ran as fast but keeps an unpacked copy beside its packing (measured on the 50257x768 LM
    head: +80 MB against +37 MB), which put int8 over half of float32's memory."""

    def __init__(self, linear: nn.Module, min_rows: int) -> None:
        """`linear`: a `DynamicQuantizedLinear` packed for fbgemm."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.min_rows = min_rows
        weight, bias = linear._weight_bias()
        self._few = linear._packed_params._packed_params
        self._many = torch.ops.onednn.qlinear_prepack(weight.int_repr(), None)
        self.register_buffer("w_scale", weight.q_per_channel_scales().float(), persistent=False)
        self.register_buffer(
            "w_zero", torch.zeros(self.out_features, dtype=torch.int32), persistent=False
        )
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows < self.min_rows:
            # reduce_range as DynamicQuantizedLinear passes it, so both sides compute the same.
            return torch.ops.quantized.linear_dynamic(x, self._few, reduce_range=True)
        x2 = x.reshape(rows, self.in_features)
        scale, zero = torch._choose_qparams_per_tensor(x2, True)
        qx = torch.quantize_per_tensor(x2, scale, zero, torch.quint8).int_repr()
        y = torch.ops.onednn.qlinear_pointwise(
            qx, scale, zero, self._many, self.w_scale, self.w_zero, self.bias,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], self.out_features)

    def _weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.ops.quantized.linear_unpack(self._few)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qint8, "
            f"fbgemm <{self.min_rows} rows, onednn >={self.min_rows} rows"
        )


_onednn_qlinear: bool | None = None


def onednn_qlinear_available() -> bool:
    """This torch build has oneDNN's int8 linear ops, and a split linear agrees with fbgemm's
    (checked once, on a probe: the ops are internal to PyTorch)."""
    global _onednn_qlinear
    if _onednn_qlinear is None:
        _onednn_qlinear = _probe_split()
    return _onednn_qlinear


def _probe_split() -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        linear = nn.Linear(40, 48)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(48, 40, generator=gen))
        linear.qconfig = per_channel_dynamic_qconfig
        with _engine("fbgemm"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want_module = DynamicQuantizedLinear.from_float(linear)
        x = torch.randn(3, 5, 40, generator=gen)
        with torch.inference_mode():
            got = SplitInt8Linear(want_module, min_rows=1)(x)
            want = want_module(x)
        return got.shape == want.shape and torch.allclose(got, want, atol=1e-3, rtol=1e-3)
    except Exception as exc:  # an internal op: missing or changed in this torch build
        logger.warning("oneDNN int8 linear unavailable: %r", exc)
        return False


@contextmanager
def _engine(name: str) -> Iterator[None]:
    """`torch.backends.quantized.engine` set to `name` while weights are packed for it."""
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

    split = (
        engines.split
        and (engines.few_rows, engines.many_rows) == ("fbgemm", "onednn")
        and onednn_qlinear_available()
    )
    if engines.few_rows in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = engines.few_rows

    def rewritten(child: nn.Module) -> nn.Module | None:
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.nx, child.nf, device=child.weight.device)
            linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), False)
            linear.bias = nn.Parameter(child.bias.detach().clone(), False)  # see _own_storage
            return linear
        if isinstance(child, NewGELUActivation):
            return nn.GELU()  # exact; within 4.8e-4 of gelu_new (module docstring)
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
    if split:
        replace_modules(
            model,
            lambda m: (
                SplitInt8Linear(m, engines.min_rows)
                if isinstance(m, DynamicQuantizedLinear)
                else None
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
    """Bytes of the weights `model` keeps: parameters, buffers and packed int8 weights (a
    `SplitInt8Linear` holds its weight twice, packed per kernel; bias and scales are buffers)."""
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams

    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for module in model.modules():
        # A DynamicQuantizedLinear's packing is its LinearPackedParams child: count it there.
        if isinstance(module, LinearPackedParams):
            weight, bias = module._weight_bias()
            total += weight.numel() * weight.element_size()
            total += 0 if bias is None else bias.numel() * bias.element_size()
        elif isinstance(module, SplitInt8Linear):
            weight, _ = module._weight_bias()
            total += 2 * weight.numel() * weight.element_size()
    return total
