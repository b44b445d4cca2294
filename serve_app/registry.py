"""Which weights a `ModelSpec` is served with, and loading them.

Resolution is cheap and separate from loading so the `/models` endpoint can say what each
id serves (real weights or a random stand-in, and the revision that goes into cache keys)
without loading anything. A configured source that cannot be had (no local copy, hub
unreachable) degrades to a stand-in of the same architecture when the spec allows it, with a
warning that reaches both the logs and the API: serving random weights must never be quiet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from serve_app import standin
from serve_app.config import ModelSpec
from serve_app.errors import ModelUnavailableError

if TYPE_CHECKING:  # transformers takes seconds to import; the ingress never needs it
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

ModelKind = Literal["hub", "local", "standin"]

RESOLVE_TTL_S = 60.0
"""How long a resolution is reused in this process: `/models` stays cheap, yet a hub that
comes back (or a local checkpoint that is replaced) is noticed within a minute."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelInfo:
    """What a model id is served with. `revision` identifies the weights (cache keys use it)."""

    id: str
    source: str | None
    kind: ModelKind
    real_weights: bool
    location: str
    revision: str
    architecture: str
    n_positions: int
    dtype: str
    warning: str | None = None

    def to_public(self) -> dict:
        """The `/models` view: no filesystem locations."""
        return {
            "id": self.id,
            "source": self.source,
            "kind": self.kind,
            "real_weights": self.real_weights,
            "revision": self.revision,
            "architecture": self.architecture,
            "dtype": self.dtype,
            "warning": self.warning,
        }


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
    load_seconds: float
    kernels: str = "stock"
    """`onednn` when the linear layers run pre-packed oneDNN matmuls (`serve_app.kernels`)."""


# --- resolution ----------------------------------------------------------------------------

_resolved: dict[tuple, tuple[float, ModelInfo | ModelUnavailableError]] = {}
_resolved_lock = threading.Lock()


def resolve_model(
    spec: ModelSpec, standin_dir: Path, hub_timeout_s: float, offline: bool
) -> ModelInfo:
    """Decide what `spec` is served with, without loading (or building) any weights.

    Order: no source -> stand-in; an existing local `save_pretrained` directory -> local; a hub
    id in the local Hugging Face cache -> hub; else (unless `offline`) the hub itself, bounded by
    `hub_timeout_s`. Anything else -> the stand-in of `spec.architecture` with a warning, or
    `ModelUnavailableError` when `spec.allow_standin` is false. Memoised for `RESOLVE_TTL_S`.
    """
    key = (spec, offline, str(standin_dir))
    now = time.monotonic()
    with _resolved_lock:
        hit = _resolved.get(key)
    if hit is not None and now - hit[0] < RESOLVE_TTL_S:
        outcome = hit[1]
    else:
        try:
            outcome = _resolve(spec, Path(standin_dir), hub_timeout_s, offline)
        except ModelUnavailableError as exc:
            outcome = exc
        with _resolved_lock:
            _resolved[key] = (now, outcome)
    if isinstance(outcome, ModelUnavailableError):
        raise ModelUnavailableError(outcome.message, **outcome.details)
    return outcome


def prepare_model(
    spec: ModelSpec, standin_dir: Path, hub_timeout_s: float, offline: bool
) -> ModelInfo:
    """Resolve, and build the stand-in on disk if that is what will be served (blocking), so
    a replica pays the one-time build at start-up rather than on a user's first request."""
    info = resolve_model(spec, standin_dir, hub_timeout_s, offline)
    if info.kind == "standin":
        standin.ensure_standin(spec.architecture, spec.seed, spec.n_layer, standin_dir)
    return info


def clear_resolution_cache() -> None:
    """Forget every memoised resolution (tests; operators after replacing a checkpoint)."""
    with _resolved_lock:
        _resolved.clear()


def _forget(spec: ModelSpec) -> None:
    with _resolved_lock:
        for key in [k for k in _resolved if k[0] == spec]:
            del _resolved[key]


def _resolve(spec: ModelSpec, standin_dir: Path, hub_timeout_s: float, offline: bool) -> ModelInfo:
    if spec.source is None:
        return _standin_info(spec, standin_dir, warning=None)
    source = spec.source
    path = Path(source).expanduser()
    if path.is_dir():
        info, reason = _local_info(spec, path)
    elif _looks_like_path(source):
        info, reason = None, "the local directory does not exist"
    else:
        info, reason = _hub_cached_info(spec, source)
        if info is None and not offline:
            info, hub_reason = _hub_online_info(spec, source, hub_timeout_s)
            reason = f"{reason}, and {hub_reason}"
        elif info is None:
            reason = f"{reason}, and offline mode forbids asking the hub"
    if info is not None:
        return info
    return _fall_back(spec, standin_dir, reason)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "\\" in source or not _HUB_ID.match(source)


def _local_info(spec: ModelSpec, path: Path) -> tuple[ModelInfo | None, str]:
    config = _read_json(path / "config.json")
    if config is None:
        return None, "the local directory has no readable config.json"
    if config.get("model_type") != "gpt2":
        return None, f"the local checkpoint is not GPT-2 (model_type={config.get('model_type')!r})"
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        return None, "the local directory has no weights file"
    info = ModelInfo(
        id=spec.id,
        source=spec.source,
        kind="local",
        real_weights=True,
        location=str(path.resolve()),
        revision=local_revision(path),
        architecture=_architecture_name(config),
        n_positions=int(config.get("n_positions") or 0),
        dtype=spec.dtype,
    )
    return info, ""


def local_revision(path: Path) -> str:
    """A short identity of a local checkpoint: sha256 over config.json and the sizes and
    mtimes of the weight and tokenizer files (hashing gigabytes of weights would make
    resolution slow; a rewritten file changes its mtime)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    patterns = ("*.safetensors", "*.bin", "*.index.json", *_TOKENIZER_FILES)
    files = sorted({f for pattern in patterns for f in path.glob(pattern) if f.is_file()})
    for f in files:
        st = f.stat()
        digest.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return f"local-{digest.hexdigest()[:16]}"


def _hub_cached_info(spec: ModelSpec, source: str) -> tuple[ModelInfo | None, str]:
    """The hub id's `main` snapshot in the local Hugging Face cache, if complete enough to load
    offline (config, weights and a tokenizer)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config_path = try_to_load_from_cache(source, "config.json")
    except Exception as exc:  # a malformed cache must not break resolution
        return None, f"the local Hugging Face cache could not be read ({type(exc).__name__})"
    if not isinstance(config_path, str):
        return None, "it is not in the local Hugging Face cache"
    snapshot = Path(config_path).parent
    config = _read_json(snapshot / "config.json")
    has_weights = any((snapshot / name).is_file() for name in _WEIGHT_FILES)
    has_tokenizer = (snapshot / "tokenizer.json").is_file() or (
        (snapshot / "vocab.json").is_file() and (snapshot / "merges.txt").is_file()
    )
    if config is None or not has_weights or not has_tokenizer:
        return None, "its copy in the local Hugging Face cache is incomplete"
    if config.get("model_type") != "gpt2":
        return None, f"it is not GPT-2 (model_type={config.get('model_type')!r})"
    return _hub_info(spec, source, snapshot.name, config), ""


def _hub_online_info(
    spec: ModelSpec, source: str, timeout_s: float
) -> tuple[ModelInfo | None, str]:
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    try:
        found = HfApi().model_info(source, timeout=timeout_s)
    except Exception as exc:  # unreachable, unknown repo, gated, offline mode...
        return None, f"the hub could not be asked ({type(exc).__name__})"
    files = {s.rfilename for s in (found.siblings or [])}
    if found.siblings is not None and not files.intersection(_WEIGHT_FILES):
        return None, "the hub repository has no PyTorch weights"
    model_type = (found.config or {}).get("model_type")
    if model_type not in (None, "gpt2"):
        return None, f"the hub repository is not GPT-2 (model_type={model_type!r})"
    revision = found.sha or "main"
    # config.json (a few hundred bytes) tells n_positions before any weight is fetched. One
    # bounded GET: hf_hub_download retries with backoff for ~25 s when the hub is gone.
    try:
        response = get_session().get(
            hf_hub_url(source, "config.json", revision=revision),
            headers=build_hf_headers(),
            timeout=timeout_s,
        )
        response.raise_for_status()
        config = response.json()
    except Exception:
        config = None
    if not isinstance(config, dict):
        config = None
    return _hub_info(spec, source, found.sha or f"{source}@main", config), ""


def _hub_info(spec: ModelSpec, source: str, revision: str, config: dict | None) -> ModelInfo:
    return ModelInfo(
        id=spec.id,
        source=source,
        kind="hub",
        real_weights=True,
        location=source,
        revision=revision,
        architecture=_architecture_name(config) if config else source,
        n_positions=int((config or {}).get("n_positions") or 0),
        dtype=spec.dtype,
    )


def _standin_info(spec: ModelSpec, standin_dir: Path, warning: str | None) -> ModelInfo:
    arch = spec.architecture
    return ModelInfo(
        id=spec.id,
        source=spec.source,
        kind="standin",
        real_weights=False,
        location=str(standin.standin_path(arch, spec.seed, spec.n_layer, standin_dir)),
        revision=standin.standin_revision(arch, spec.seed, spec.n_layer),
        architecture=arch,
        n_positions=standin.architecture_config(arch, spec.n_layer)["n_positions"],
        dtype=spec.dtype,
        warning=warning,
    )


def _fall_back(spec: ModelSpec, standin_dir: Path, reason: str) -> ModelInfo:
    if not spec.allow_standin:
        raise ModelUnavailableError(
            f"model {spec.id!r}: source {spec.source!r} is unavailable: {reason}; "
            "allow_standin is false, so nothing is served",
            model=spec.id,
        )
    warning = (
        f"source {spec.source!r} is unavailable ({reason}); serving a RANDOM-WEIGHT stand-in "
        f"with the {spec.architecture} architecture (seed {spec.seed}) instead: its output "
        "is meaningless text"
    )
    bar = "!" * 100
    logger.warning("\n%s\n!!! STAND-IN SERVED FOR MODEL %r: %s\n%s", bar, spec.id, warning, bar)
    return _standin_info(spec, standin_dir, warning=warning)


def _architecture_name(config: dict) -> str:
    """The stand-in size a checkpoint's shape matches (`gpt2-medium`), else its model_type."""
    shape = {k: config.get(k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
    for name, kwargs in standin.ARCHITECTURES.items():
        if all(kwargs[k] == v for k, v in shape.items()):
            return name
    return str(config.get("model_type") or "unknown")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- loading -------------------------------------------------------------------------------


def load_model(spec: ModelSpec, info: ModelInfo, standin_dir: Path) -> LoadedModel:
    """Load what `info` (from `resolve_model(spec, ...)`) names, in `spec.dtype`. Blocking
    (seconds to minutes): run it in a worker thread.

    A hub or local source that fails to load raises `ModelUnavailableError` rather than
    quietly loading the stand-in: callers key the response cache on the resolved
    `info.revision`, and stand-in text must never be cached under a real model's revision.
    The failed resolution is forgotten, so the next `resolve_model` looks at the source again
    (and falls back to the stand-in then, if it is still unavailable and allowed)."""
    started = time.perf_counter()
    if info.kind == "standin":
        model, tokenizer = _load_standin(spec, standin_dir)
    else:
        try:
            model, tokenizer = _load_checkpoint(info)
        except Exception as exc:
            logger.error("model %r: loading %s failed: %r", spec.id, info.location, exc)
            _forget(spec)
            raise ModelUnavailableError(
                f"model {spec.id!r}: loading its {info.kind} source {spec.source!r} failed "
                f"({type(exc).__name__})",
                model=spec.id,
            ) from exc

    model = _apply_dtype(model, spec.dtype)
    model.eval()
    model.requires_grad_(False)
    from serve_app.kernels import native_bfloat16, pack_linears, use_decode_attention

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
        load_seconds=time.perf_counter() - started,
        kernels=kernels,
    )


def _load_standin(spec: ModelSpec, standin_dir: Path):
    path = standin.ensure_standin(spec.architecture, spec.seed, spec.n_layer, Path(standin_dir))
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
        raise ModelUnavailableError(f"{location!r} has no fast (tokenizers) tokenizer")
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

    from serve_app.kernels import replace_modules

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
