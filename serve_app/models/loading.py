"""Loading the weights a `ModelInfo` names, in the configured dtype. Blocking and
torch-heavy: the generator runs it on its loader thread; the ingress never imports it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.config import ModelSpec
from serve_app.errors import ModelUnavailableError
from serve_app.models.device import Placement
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
    """`onednn` when the linear layers run pre-packed oneDNN matmuls (`generation.kernels`),
    `int8` for quantized ones, `cuda` on a GPU."""
    placement: Placement | None = None
    """Device, dtype and the kernels' name, as logged at start-up and shown by `GET /models`."""
    device: str = "cpu"


def load_model(spec: ModelSpec, info: ModelInfo, standin_dir: Path) -> LoadedModel:
    """Load what `info` (from `resolve_model(spec, ...)`) names, in `spec.dtype`. Blocking
    (seconds to minutes): run it in a worker thread.

    A hub or local source that fails to load raises `ModelUnavailableError` rather than
    quietly loading the stand-in: callers key the response cache on the resolved
    `info.revision`, and stand-in text must never be cached under a real model's revision.
    The failed resolution is forgotten, so the next `resolve_model` looks at the source again
    (and falls back to the stand-in then, if it is still unavailable and allowed).

    A model this replica cannot run as configured (`device.choose_placement`: cuda without a
    GPU, bfloat16 without native bf16, ...) raises `ModelUnavailableError` before any weight
    is read."""
    from serve_app.models.device import local_placement

    placement = local_placement(spec)
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

    model, kernels = _place(model, placement)
    model.eval()
    model.requires_grad_(False)
    if spec.kernels == "onednn" and placement.dtype in ("float32", "bfloat16"):
        from serve_app.generation.kernels import pack_linears

        if pack_linears(model):
            kernels = "onednn"
    if kernels in ("onednn", "int8"):
        from serve_app.generation.kernels import use_decode_attention

        use_decode_attention(model)
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
        placement=placement,
        device=placement.device,
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


def _place(model, placement: Placement):
    """`model` (float32, CPU) moved to its device and dtype; and the kernels' short name."""
    import torch

    if placement.device == "cuda":
        dtype = getattr(torch, placement.dtype)
        return model.to(device="cuda", dtype=dtype), "cuda"
    if placement.dtype == "float32":
        return model, "stock"
    if placement.dtype == "bfloat16":
        return model.to(torch.bfloat16), "stock"
    if placement.dtype == "int8":
        from serve_app.models.device import cpu_flags, int8_engine
        from serve_app.models.int8 import quantize_int8

        return quantize_int8(model, int8_engine(cpu_flags())), "int8"
    raise ModelUnavailableError(f"unsupported dtype {placement.dtype!r}", dtype=placement.dtype)
