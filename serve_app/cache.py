"""Response cache policy, keys and value format.

Only deterministic requests are cached (greedy, or sampling with an explicit seed). The key
covers the model id, the weights' identity (a stand-in and the real `gpt2` never share entries),
the prompt and every generation parameter that can change the output.

Values are compact JSON arrays, zlib-compressed above a size threshold; a one-byte tag says
which, so the threshold can change without invalidating what is stored. The tiers that hold
them live in `lru` (L1), `redis_tier` (L2) and `tiered_cache` (both, with single-flight).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass

from serve_app.domain import SamplingParams

KEY_VERSION = 2  # 2: tagged JSON-array values


def is_cacheable(params: SamplingParams) -> bool:
    return params.deterministic


def key_prefix(prefix: str, model_id: str | None = None) -> str:
    """The prefix of every response key, or of one model's (keys embed the model id)."""
    return f"{prefix}:resp:" if model_id is None else f"{prefix}:resp:{model_id}:"


def cache_key(
    prefix: str, model_id: str, model_revision: str, prompt: str, params: SamplingParams
) -> str:
    payload = json.dumps(
        {
            "v": KEY_VERSION,
            "model": model_id,
            "revision": model_revision,
            "prompt": prompt,
            "params": asdict(params.normalized()),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()
    return key_prefix(prefix, model_id) + digest


_PLAIN, _ZLIB = b"j", b"z"
# Python's per-object overhead for an entry held decoded in the L1 (str, ints, tuple, dict slot).
ENTRY_OVERHEAD_BYTES = 400


@dataclass(frozen=True)
class CachedResponse:
    completion: str
    prompt_tokens: int
    completion_tokens: int
    model_source: str
    model_revision: str

    def encode(self, compress_min_bytes: int = 1024) -> bytes:
        raw = json.dumps(
            [
                self.completion,
                self.prompt_tokens,
                self.completion_tokens,
                self.model_source,
                self.model_revision,
            ],
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        if len(raw) >= compress_min_bytes:
            packed = zlib.compress(raw, 6)
            if len(packed) < len(raw):
                return _ZLIB + packed
        return _PLAIN + raw

    @classmethod
    def decode(cls, blob: bytes) -> CachedResponse:
        """Raises ValueError for anything this version did not write."""
        tag, body = blob[:1], blob[1:]
        try:
            if tag == _ZLIB:
                body = zlib.decompress(body)
            elif tag != _PLAIN:
                raise ValueError(f"unknown cache value tag {tag!r}")
            completion, prompt_tokens, completion_tokens, source, revision = json.loads(body)
        except (zlib.error, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"undecodable cache value: {exc}") from exc
        if not (isinstance(completion, str) and isinstance(prompt_tokens, int)):
            raise ValueError("cache value has the wrong shape")
        return cls(completion, prompt_tokens, completion_tokens, source, revision)

    def memory_size(self) -> int:
        """Estimated bytes this value holds when kept decoded in the L1."""
        return (
            ENTRY_OVERHEAD_BYTES
            + len(self.completion.encode())
            + len(self.model_source)
            + len(self.model_revision)
        )
