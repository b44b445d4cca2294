"""Loading the weights a `ModelInfo` names, in the configured dtype. Blocking and
torch-heavy: the generator runs it on its loader thread; the ingress never imports it.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.config import ModelSpec
from serve_app.errors import ModelUnavailableError
from serve_app.models.resolve import ModelInfo, describe_source, forget_resolution
from serve_app.models.standin import ensure_standin

if TYPE_CHECKING:  # transformers takes seconds to import
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

logger = logging.getLogger("ray.serve").getChild(__name__)

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class LoadedModel:
    """A model ready for inference, with what the decoding loop needs to stay in bounds."""

    info: ModelInfo
    model: GPT2LMHeadModel  # eval mode, requires_grad off, in `info.dtype`
    tokenizer: PreTrainedTokenizerFast
    eos_token_id: int
    vocab_limit: int
    """Ids >= this are never sampled: min(embedding rows, tokenizer size)."""
    n_positions: int
    kernels: str = "stock"
    """`onednn` when the linear layers run pre-packed oneDNN matmuls (`generation.kernels`)."""


def load_model(spec: ModelSpec, info: ModelInfo, standin_dir: Path) -> LoadedModel:
    """Load what `info` (from `resolve_model(spec, ...)`) names, in `spec.dtype`. Blocking
    (seconds to minutes): run it in a worker thread.

    A hub or local source that fails to load raises `ModelUnavailableError` rather than
    quietly loading the stand-in: callers key the response cache on the resolved
    `info.revision`, and stand-in text must never be cached under a real model's revision.
    The failed resolution is forgotten, so the next `resolve_model` looks at the source again
    (and falls back to the stand-in then, if it is still unavailable and allowed)."""
    if info.kind == "standin":
        model, tokenizer = _load_standin(spec, standin_dir)
    else:
        try:
            model, tokenizer = _load_checkpoint(info)
        except Exception as exc:
            logger.error("model %r: loading %s failed: %r", spec.id, info.location, exc)
            forget_resolution(spec)
            raise ModelUnavailableError(
                f"model {spec.id!r}: loading {describe_source(spec)} failed ({type(exc).__name__})",
                model=spec.id,
            ) from exc

    model = _apply_dtype(model, spec.dtype)
    model.eval()
    model.requires_grad_(False)
    from serve_app.generation.kernels import native_bfloat16, pack_linears, use_decode_attention

    kernels = "stock"
    if spec.kernels == "onednn" and spec.dtype != "int8-dynamic" and pack_linears(model):
        use_decode_attention(model)
        kernels = "onednn"
    if spec.dtype == "bfloat16" and not native_bfloat16():
        logger.warning(
            "model %r: this CPU has no bfloat16 kernels (oneDNN needs AVX-512); bfloat16 "
            "matmuls fall back to slow generic code: expect it many times slower than float32 "
            "(measured on an AVX-only CPU: 8 tokens for 8 rows 19 s against 0.6 s)",
            spec.id,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        raise ModelUnavailableError(f"model {spec.id!r} has no end-of-text token", model=spec.id)
    return LoadedModel(
        info=info,
        model=model,
        tokenizer=tokenizer,
        eos_token_id=int(eos_token_id),
        vocab_limit=min(model.config.vocab_size, len(tokenizer)),
        n_positions=int(model.config.n_positions),
        kernels=kernels,
    )


def _load_standin(spec: ModelSpec, standin_dir: Path):
    path = ensure_standin(spec.architecture, spec.seed, spec.n_layer, Path(standin_dir))
    return _from_pretrained(str(path), revision=None, local_files_only=True)


def _load_checkpoint(info: ModelInfo):
    if info.kind == "local":
        return _from_pretrained(info.location, revision=None, local_files_only=True)
    from huggingface_hub import constants

    revision = info.revision if _COMMIT_SHA.match(info.revision) else "main"
    try:  # resolved from the cache, or fetched before: no network round trip
        return _from_pretrained(info.location, revision=revision, local_files_only=True)
    except Exception:
        if constants.HF_HUB_OFFLINE:
            raise
    return _from_pretrained(info.location, revision=revision, local_files_only=False)


def _from_pretrained(location: str, revision: str | None, local_files_only: bool):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if revision is not None:
        kwargs["revision"] = revision
    model = GPT2LMHeadModel.from_pretrained(location, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelUnavailableError("the checkpoint has no fast (tokenizers) tokenizer")
    return model, tokenizer


def _apply_dtype(model, dtype: str):
    import torch

    if dtype == "float32":
        return model
    if dtype == "bfloat16":
        return model.to(torch.bfloat16)
    if dtype == "int8-dynamic":
        return _quantize_int8_dynamic(model)
    raise ModelUnavailableError(f"unsupported dtype {dtype!r}", dtype=dtype)


def _quantize_int8_dynamic(model):
    """int8 weights, fp32 activations quantized per batch, for every big matmul.

    GPT-2's attention and MLP projections are transformers' `Conv1D` (a transposed Linear),
    which `quantize_dynamic` does not know, so they become `nn.Linear` first. `lm_head` is
    quantized too (it is the biggest single matmul of a decoding step); per-channel scales keep
    its logits closest to fp32. Measured on the gpt2 stand-in (2 CPU cores): generating 4x32
    tokens 2.1 s fp32, 0.84 s with the blocks only quantized, 0.29 s with lm_head as well.
    """
    import torch
    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from transformers.pytorch_utils import Conv1D

    from serve_app.generation.kernels import replace_modules

    def as_linear(conv: nn.Module) -> nn.Module | None:
        if not isinstance(conv, Conv1D):
            return None
        linear = nn.Linear(conv.nx, conv.nf, device=conv.weight.device, dtype=conv.weight.dtype)
        linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
        return linear

    replace_modules(model, as_linear)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not a dependency) but works.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        return quantize_dynamic(
            model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
