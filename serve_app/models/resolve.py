"""Which weights a `ModelSpec` is served with (`models.loading` loads them).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from serve_app.config import ModelSpec
from serve_app.errors import ModelUnavailableError
from serve_app.models import standin
from serve_app.models.device import cpu_flags, local_placement, planned_kernel

logger = logging.getLogger("ray.serve").getChild(__name__)

ModelKind = Literal["hub", "local", "standin"]

RESOLVE_TTL_S = 60.0
"""How long a resolution is reused in this process: `/models` stays cheap, yet a hub that
comes back (or a local checkpoint that is replaced) is noticed within a minute."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
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
    device: str = "auto"
    kernel: str | None = None
    """The kernels this machine's CPU (or a GPU) runs the model with: `device.planned_kernel`."""

    def to_public(self) -> dict:
        """The `/models` view: no filesystem locations (a local source shows as None)."""
        return {
            "id": self.id,
            "source": None if self.source is None or _looks_like_path(self.source) else self.source,
            "kind": self.kind,
            "real_weights": self.real_weights,
            "revision": self.revision,
            "architecture": self.architecture,
            "dtype": self.dtype,
            "device": self.device,
            "kernel": self.kernel,
            "warning": self.warning,
        }


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
            kernel = planned_kernel(spec, cpu_flags())
            outcome = replace(outcome, device=spec.device, kernel=kernel)
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
    a replica pays the one-time build at start-up rather than on a user's first request.
    Raises `ModelUnavailableError` when the model cannot run on this replica as configured
    (device cuda without a GPU, bfloat16 without native bf16): the replica fails to start
    with that message rather than serving something else."""
    info = resolve_model(spec, standin_dir, hub_timeout_s, offline)
    placement = local_placement(spec)  # refuses what this replica cannot run, before serving
    logger.info("model %r runs on %s with %s kernels", spec.id, placement.device, placement.kernel)
    if info.kind == "standin":
        standin.ensure_standin(spec.architecture, spec.seed, spec.n_layer, standin_dir)
    return info


def clear_resolution_cache() -> None:
    """Forget every memoised resolution (tests; operators after replacing a checkpoint)."""
    with _resolved_lock:
        _resolved.clear()


def forget_resolution(spec: ModelSpec) -> None:
    """Look at `spec`'s source afresh next time (its load failed)."""
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


def describe_source(spec: ModelSpec) -> str:
    """How messages that reach clients name a source: a hub id as it is, a local directory
    without its path (error bodies and `/models` never show the server's filesystem)."""
    if spec.source is None:
        return "the stand-in"
    if _looks_like_path(spec.source):
        return "the local checkpoint"
    return f"source {spec.source!r}"


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
            f"model {spec.id!r}: {describe_source(spec)} is unavailable: {reason}; "
            "allow_standin is false, so nothing is served",
            model=spec.id,
        )
    warning = (
        f"{describe_source(spec)} is unavailable ({reason}); serving a RANDOM-WEIGHT stand-in "
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
