"""Response cache policy, keys and value format.

Only deterministic requests are cached (greedy, or sampling with an explicit seed). The key
covers the model id, the weights' identity (a stand-in and the real `gpt2` never share entries),
the prompt and every generation parameter that can change the output.

A value is the `Generation` record without what belongs to one request (id, user, timing,
feedback): a JSON object, zlib-compressed above a size threshold; a one-byte tag says which, so
the threshold can change without invalidating what is stored. A field added to the record is
cached with it. The tiers that hold values live in `lru` (L1), `redis_tier` (L2) and `tiered`
(both, with single-flight).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib

from serve_app.domain import Generation, GenerationRequest

KEY_VERSION = 3  # 3: values are JSON objects of the Generation record

# Fields of a `Generation` that describe one request's answer, not the cached text.
_PER_REQUEST = frozenset(
    {
        "id",
        "created_at",
        "feedback",
        "user_id",
        "key_name",
        "cached",
        "latency_ms",
        "ttft_ms",
        "messages",
        "metadata",
    }
)
_CACHED_FIELDS = frozenset(f.name for f in dataclasses.fields(Generation)) - _PER_REQUEST


def key_prefix(prefix: str, model_id: str | None = None) -> str:
    """The prefix of every response key, or of one model's (keys embed the model id)."""
    return f"{prefix}:resp:" if model_id is None else f"{prefix}:resp:{model_id}:"


def cache_key(prefix: str, request: GenerationRequest, model_revision: str) -> str:
    payload = json.dumps(
        {
            "v": KEY_VERSION,
            "model": request.model,
            "revision": model_revision,
            "prompt": request.prompt,
            "params": dataclasses.asdict(request.params.normalized()),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()
    return key_prefix(prefix, request.model) + digest


_PLAIN, _ZLIB = b"j", b"z"
# Python's per-object overhead for an entry held decoded in the L1 (str, ints, dataclass, dict).
ENTRY_OVERHEAD_BYTES = 600


def encode_value(value: Generation, compress_min_bytes: int = 1024) -> bytes:
    raw = json.dumps(
        {name: getattr(value, name) for name in _CACHED_FIELDS},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    if len(raw) >= compress_min_bytes:
        packed = zlib.compress(raw, 6)
        if len(packed) < len(raw):
            return _ZLIB + packed
    return _PLAIN + raw


def decode_value(blob: bytes) -> Generation:
    """Raises ValueError for anything this version did not write."""
    tag, body = blob[:1], blob[1:]
    try:
        if tag == _ZLIB:
            body = zlib.decompress(body)
        elif tag != _PLAIN:
            raise ValueError(f"unknown cache value tag {tag!r}")
        fields = json.loads(body)
    except (zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"undecodable cache value: {exc}") from exc
    if not isinstance(fields, dict) or set(fields) != _CACHED_FIELDS:
        raise ValueError("cache value has the wrong shape")
    if not isinstance(fields["completion"], str) or not isinstance(fields["prompt_tokens"], int):
        raise ValueError("cache value has the wrong types")
    return Generation(**fields)


def memory_size(value: Generation) -> int:
    """Estimated bytes `value` holds when kept decoded in the L1."""
    return (
        ENTRY_OVERHEAD_BYTES
        + len(value.prompt.encode())
        + len(value.completion.encode())
        + len(value.model_source)
        + len(value.model_revision)
    )
