"""Every setting of the application, typed, defaulted and documented in one place.

The `args:` block of a Serve config file is validated into `AppArgs` by the app builder.
Environment variables are read here and only here (`EnvSettings`); they override the YAML
for the settings that differ between machines (where Redis and the database live).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Stand-in architectures: the real GPT-2 family shapes, plus tiny shapes for tests.
Architecture = Literal["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2", "tiny"]
DType = Literal["float32", "int8", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Kernels = Literal["onednn", "stock"]
DTYPE_ALIASES = {"int8-dynamic": "int8"}
"""Deprecated dtype spellings still accepted (with a warning), and what they mean now."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChatTemplate(_Strict):
    """How `/v1/chat/completions` turns messages into a GPT-2 prompt. GPT-2 has no chat format of
    its own, so this is plain text: each message rendered by its role's pattern (`{content}`
    is replaced by the message), then `generation_prompt`. Generation also stops at every
    string in `stop` (by default, where the model starts the next user turn)."""

    system: str = Field(default="{content}\n\n", description="Pattern of a system message.")
    user: str = Field(default="User: {content}\n", description="Pattern of a user message.")
    assistant: str = Field(
        default="Assistant: {content}\n", description="Pattern of an earlier assistant message."
    )
    generation_prompt: str = Field(
        default="Assistant:", description="Appended after the messages: the model continues it."
    )
    stop: tuple[str, ...] = Field(
        default=("\nUser:",),
        max_length=4,
        description="Stop strings added to every chat request's own.",
    )

    @field_validator("system", "user", "assistant")
    @classmethod
    def _has_content(cls, pattern: str) -> str:
        if "{content}" not in pattern:
            raise ValueError("a message pattern must contain {content}")
        return pattern

    def render(self, messages: list[dict[str, str]]) -> str:
        patterns = {"system": self.system, "user": self.user, "assistant": self.assistant}
        rendered = (patterns[m["role"]].replace("{content}", m["content"]) for m in messages)
        return "".join(rendered) + self.generation_prompt


class ModelSpec(_Strict):
    """One servable model id and where its weights come from."""

    id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$",
        description="The id clients ask for (`model` field or `serve_multiplexed_model_id`).",
    )
    source: str | None = Field(
        default=None,
        description=(
            "A Hugging Face hub id (e.g. `gpt2`) or a local `save_pretrained` directory. "
            "None means: always serve the stand-in."
        ),
    )
    architecture: Architecture = Field(
        default="gpt2",
        description="GPT-2 size whose architecture the stand-in copies (random weights).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the stand-in's random weights.")
    n_layer: int | None = Field(
        default=None, ge=1, le=48, description="Override the architecture's layer count."
    )
    allow_standin: bool = Field(
        default=True,
        description="Serve the stand-in (with a loud warning) when `source` cannot be loaded.",
    )
    dtype: DType = Field(
        default="float32",
        description=(
            "Inference precision. `float32`: exact. `int8`: int8 weights of every linear layer "
            "(LM head included), activations quantized per step; about 3x less memory. "
            "`bfloat16`: only on CPUs with native bf16 (avx512_bf16 or AMX), refused elsewhere; "
            "`float16`: CUDA only. `int8-dynamic` is a deprecated alias of `int8`."
        ),
    )
    device: Device = Field(
        default="auto",
        description=(
            "`auto`: the replica's GPU when Ray assigned one (deployment `num_gpus`), else the "
            "CPU. `cuda`: a GPU is required; without one the replica fails at start-up. `cpu`: "
            "never a GPU."
        ),
    )
    chat_template: ChatTemplate = Field(
        default_factory=ChatTemplate, description="Prompt format of /v1/chat/completions."
    )
    kernels: Kernels = Field(
        default="onednn",
        description=(
            "Matmuls of float32 / bfloat16 models: `onednn` pre-packs every linear layer's "
            "weight for oneDNN (a 32-row float32 decode step's matmuls: 26.7 vs 76.4 ms on MKL, "
            "which does not use AVX-512 on AMD CPUs); `stock` keeps PyTorch's default "
            "(MKL). Falls back to `stock` where oneDNN is missing. int8 has its own."
        ),
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, dtype: object) -> object:
        if isinstance(dtype, str) and dtype in DTYPE_ALIASES:
            new = DTYPE_ALIASES[dtype]
            warnings.warn(
                f"dtype {dtype!r} is deprecated: write {new!r}", FutureWarning, stacklevel=2
            )
            return new
        return dtype

    @model_validator(mode="after")
    def _dtype_fits_device(self) -> ModelSpec:
        if self.dtype == "float16" and self.device == "cpu":
            raise ValueError("dtype float16 needs a GPU: use device cuda or auto, or dtype int8")
        return self


class GeneratorOptions(_Strict):
    """Generator replica settings fixed at start-up (tunables live in the deployment's
    `user_config`, see `BatchingConfig`)."""

    max_models_per_replica: int = Field(
        default=2, ge=1, description="LRU size of `@serve.multiplexed` on each replica."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "torch intra-op threads. Ray sets OMP_NUM_THREADS to the replica's num_cpus, "
            "which can starve big batches; None uses every core of the machine."
        ),
    )
    decode_niceness: int = Field(
        default=10,
        ge=0,
        le=19,
        description=(
            "How much nicer than the replica the decode thread and its torch threads run "
            "(Linux; capped at 19). The request path then gets a core the moment it has work "
            "(refusals, health checks, streamed text), and decoding takes the rest. 0: same "
            "priority."
        ),
    )
    crash_marker: str | None = Field(
        default=None,
        min_length=8,
        description="Testing only: a prompt containing this string makes the decode thread "
        "die as a crash would (the health and recovery tests use it). Never set in production.",
    )


class BatchingConfig(_Strict):
    """The generator's `user_config`: applied live in `reconfigure()`, no restart."""

    max_batch_size: int = Field(
        default=32,
        ge=1,
        le=256,
        description="Most rows decoded together per model; 1 turns batching off. Keep the "
        "deployment's max_ongoing_requests above it, or batches cannot fill.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.0,
        ge=0.0,
        le=5.0,
        description="How long @serve.batch gathers arrivals before handing them to the decode "
        "loop. 0: hand over at once; the decode loop groups what is pending at each step "
        "boundary anyway, and a lone request would pay any wait in full.",
    )
    admit_min_rows: int = Field(
        default=8,
        ge=1,
        le=256,
        description="While a model decodes at least this many rows, newcomers are held until "
        "this many (or as many as there are free slots) can be prefilled together: a prefill "
        "stalls every running row, so one per arrival would eat the decode budget. A smaller "
        "batch takes newcomers at its next step.",
    )
    admit_max_wait_s: float = Field(
        default=0.25,
        ge=0.0,
        le=10.0,
        description="Longest a newcomer is held for company before it is admitted anyway. An "
        "idle model admits at once, so a lone request never waits.",
    )
    stream_messages_per_step: int = Field(
        default=8,
        ge=1,
        le=256,
        description="How many streams may send text after one decode step. With more streams "
        "than this, each sends every few steps (its text accumulates meanwhile; the first text "
        "always goes at once): every message crosses Ray and the HTTP proxy, and at 32 streams "
        "one per token cost about a fifth of the decode throughput on 2 cores. vLLM's "
        "`stream_interval` is the same trade-off.",
    )
    max_queued_requests: int = Field(
        default=64,
        ge=0,
        le=100_000,
        description="Requests a replica holds waiting for a batch slot (besides the rows it "
        "decodes); one more is refused at once with a 503 and Retry-After, before any model "
        "work. Keep the deployment's max_ongoing_requests at least max_batch_size + this, or "
        "Ray queues the excess in front of the replica instead.",
    )
    single_thread_max_rows: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Decode steps over at most this many rows run on one torch thread, leaving "
        "a core to the request path; prefills and larger steps use every thread. 0: every step "
        "uses every thread. Which wins depends on the machine: measure with `make bench`.",
    )


class PersistenceTuning(_Strict):
    """The Persistence deployment's `user_config`: applied live in `reconfigure()`, no restart."""

    group_commit: bool = Field(
        default=True,
        description="Commit every pending write in one transaction. False commits each row on "
        "its own (the benchmark's baseline).",
    )
    max_rows_per_commit: int = Field(
        default=1024, ge=1, le=100_000, description="Upper bound on the rows of one transaction."
    )


class PersistenceOptions(_Strict):
    """The system of record's settings fixed at start-up."""

    retention_days: float | None = Field(
        default=None,
        gt=0,
        description="Delete records older than this many days (hourly, and by `python -m "
        "serve_app.storage purge`). None keeps everything.",
    )
    purge_interval_s: float = Field(
        default=3600.0, gt=0, description="How often the deployment applies `retention_days`."
    )
    write_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a request waits for its record to commit before it gets a 503.",
    )


class CacheOptions(_Strict):
    """The response cache: an in-process L1 per ingress replica in front of a Redis L2.

    The fields in `LIVE_CACHE_FIELDS` can also be changed without a restart through the
    Ingress deployment's `user_config` (applied in `reconfigure()`)."""

    enabled: bool = Field(default=True, description="Answer deterministic requests from cache.")
    ttl_s: int = Field(default=3600, ge=1, description="Lifetime of a cached response (L2).")
    prefix: str = Field(
        default="gpt2serve",
        pattern=r"^[A-Za-z0-9._:\-]{1,64}$",
        description="Namespace of every Redis key.",
    )
    timeout_s: float = Field(
        default=0.25, gt=0, description="Bound on any one Redis call; slower counts as a miss."
    )
    l1_max_entries: int = Field(
        default=10_000, ge=0, description="Entries the in-process L1 holds at most; 0 disables it."
    )
    l1_max_bytes: int = Field(
        default=64 * 2**20, ge=0, description="Estimated bytes the in-process L1 holds at most."
    )
    l1_ttl_s: float | None = Field(
        default=None,
        gt=0,
        description="Cap on an L1 entry's lifetime. An L1 entry never outlives its L2 entry "
        "either way; None means the L2 lifetime is the only cap.",
    )
    compress_min_bytes: int = Field(
        default=1024, ge=1, description="Values at least this large are stored zlib-compressed."
    )
    breaker_failures: int = Field(
        default=3, ge=1, description="Consecutive Redis failures that open the circuit breaker."
    )
    breaker_reset_s: float = Field(
        default=0.5,
        gt=0,
        description="How long the breaker stays open before a background probe; doubles after "
        "each failed probe, up to `breaker_max_reset_s`.",
    )
    breaker_max_reset_s: float = Field(
        default=5.0, gt=0, description="Longest wait between two probes of a Redis that is down."
    )
    lock_ttl_s: float = Field(
        default=30.0,
        ge=0,
        description="Lease of the Redis marker that lets only one ingress replica generate a "
        "given answer; replicas that see it wait for the answer at most this long. 0 turns "
        "cross-replica single-flight off (it always works within a replica).",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="An admin API key named `cache-admin` (the older way to enable "
        "`DELETE /cache`; see `access.api_keys`). Env CACHE_ADMIN_TOKEN overrides.",
    )


LIVE_CACHE_FIELDS = frozenset(
    {"ttl_s", "l1_max_entries", "l1_max_bytes", "l1_ttl_s", "compress_min_bytes", "timeout_s"}
)


def apply_cache_user_config(options: CacheOptions, user_config: dict[str, object]) -> CacheOptions:
    """The Ingress `user_config` on top of the YAML `args.cache`; other keys are an error."""
    unknown = set(user_config) - LIVE_CACHE_FIELDS
    if unknown:
        raise ValueError(
            f"Ingress user_config may only set {sorted(LIVE_CACHE_FIELDS)}, got {sorted(unknown)}"
        )
    return CacheOptions.model_validate({**options.model_dump(), **user_config})


_PERIODS_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_PERIOD_ALIASES = {"s": "second", "sec": "second", "m": "minute", "min": "minute", "h": "hour"}
_PERIOD_ALIASES |= {"secs": "second", "mins": "minute", "d": "day"}


class RateLimit(_Strict):
    """A token bucket: `requests` per `period_s`, spent one per request, refilled evenly."""

    requests: int = Field(ge=1, le=1_000_000)
    period_s: float = Field(gt=0)

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """`20/minute`, `5/second`, `1000/hour`, `10000/day` (also s, sec, m, min, h)."""
        count, sep, unit = text.strip().partition("/")
        unit = unit.strip().lower()
        unit = _PERIOD_ALIASES.get(unit, unit[:-1] if unit.endswith("s") else unit)
        if not sep or not count.strip().isdigit() or unit not in _PERIODS_S:
            raise ValueError(f"a rate limit looks like '20/minute', got {text!r}")
        return cls(requests=int(count), period_s=_PERIODS_S[unit])

    def __str__(self) -> str:
        return f"{self.requests}/{self.period_s:g}s"


class ApiKey(_Strict):
    """A key clients send as `Authorization: Bearer <key>`, kept only as its SHA-256."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9._\-]{1,64}$",
        description="Stored with every record the key asks for, logged, filterable in history.",
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key.")
    admin: bool = Field(
        default=False, description="May also call the admin routes (DELETE /cache)."
    )

    @classmethod
    def from_secret(cls, secret: str, name: str | None = None, admin: bool = False) -> ApiKey:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        return cls(name=name or f"key-{digest[:8]}", sha256=digest, admin=admin)


class AccessOptions(_Strict):
    """Who may call the API, and how often. See the README's "Securing it"."""

    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="With any non-admin key here (or in env API_KEYS) every route but /livez, "
        "/healthz, the docs and the playground needs a key; none: the API is open.",
    )
    rate_limit: RateLimit | None = Field(
        default=None,
        description="Per key (per client address when keys are off), e.g. `20/minute`; "
        "a token bucket in Redis shared by every ingress replica. Env RATE_LIMIT overrides.",
    )

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _parse_rate(cls, value: object) -> object:
        return RateLimit.parse(value) if isinstance(value, str) else value

    @field_validator("api_keys")
    @classmethod
    def _unique_names(cls, keys: list[ApiKey]) -> list[ApiKey]:
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError(f"API key names must be unique, got {names}")
        return keys

    @property
    def keys_required(self) -> bool:
        return any(not key.admin for key in self.api_keys)


class LimitOptions(_Strict):
    """Caps on what one request may ask for; beyond them the request is a 400."""

    max_prompts_per_request: int = Field(
        default=32,
        ge=1,
        le=128,
        description="Completions one request may ask for (prompts, times `n` on /v1).",
    )
    max_new_tokens: int = Field(
        default=1024, ge=1, le=4096, description="New tokens one completion may ask for."
    )
    max_history_page: int = Field(
        default=100, ge=1, le=1000, description="Records in one page of history or listings."
    )


class TimeoutOptions(_Strict):
    """How long the ingress waits for the other deployments (a Ray replica that died or hangs
    must not hold a client). Persistence writes have `persistence.write_timeout_s`."""

    generate_s: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="For the generator to answer a prompt (its queue included), or to send the "
        "next event of a stream; then a 504.",
    )
    read_s: float = Field(
        default=15.0,
        gt=0,
        le=600,
        description="For a read of the system of record (history, records, feedback); then a 503.",
    )


class AppArgs(_Strict):
    """The `args:` block of a Serve config file."""

    models: list[ModelSpec] = Field(min_length=1)
    default_model: str | None = Field(
        default=None, description="Model used when a request names none; first model if unset."
    )
    forbidden_words: list[str] = Field(
        default_factory=lambda: ["violence", "hate"],
        description="Prompts containing any of these words (case-insensitive) get a 400.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis for the response cache. Unset: the application starts one embedded "
        "redis-server (its RedisHost deployment) on a free loopback port, shared by every "
        "ingress replica. Env REDIS_URL overrides.",
    )
    database_url: str = Field(
        default="sqlite+aiosqlite:///data/generations.db",
        description="SQLAlchemy async URL of the system of record. Env DATABASE_URL overrides.",
    )
    multi_node: bool = Field(
        default=False,
        description="The app spans several nodes: a shared Redis (`redis_url`) and a "
        "PostgreSQL `database_url` are then required, since the embedded redis-server and a "
        "SQLite file belong to one machine. A missing one fails the deploy with a message.",
    )
    standin_dir: str | None = Field(
        default=None,
        description="Where stand-in checkpoints are built and cached. Env STANDIN_DIR "
        "overrides; default ~/.cache/serve-gpt2/standins.",
    )
    hub_timeout_s: float = Field(
        default=5.0, gt=0, description="How long to try the Hugging Face hub before a stand-in."
    )
    offline: bool = Field(
        default=False,
        description="Never contact the Hugging Face hub (also set by env HF_HUB_OFFLINE=1).",
    )
    max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=64 << 20,
        description="Largest request body the ingress reads; a larger one is a 413 before any "
        "parsing.",
    )
    log_prompts: bool = Field(
        default=False,
        description="Put prompt text in the per-request log lines (off: prompts never reach the "
        "logs, only their counts and token numbers).",
    )
    access: AccessOptions = Field(default_factory=AccessOptions)
    timeouts: TimeoutOptions = Field(default_factory=TimeoutOptions)
    limits: LimitOptions = Field(default_factory=LimitOptions)
    cache: CacheOptions = Field(default_factory=CacheOptions)
    generator: GeneratorOptions = Field(default_factory=GeneratorOptions)
    persistence: PersistenceOptions = Field(default_factory=PersistenceOptions)

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        return models

    @model_validator(mode="after")
    def _default_is_known(self) -> AppArgs:
        if self.default_model is not None and self.default_model not in self.model_ids:
            raise ValueError(f"default_model {self.default_model!r} is not one of {self.model_ids}")
        return self

    @property
    def needs_redis(self) -> bool:
        """Redis holds the response cache's L2 and the rate limiter's buckets."""
        return self.cache.enabled or self.access.rate_limit is not None

    @property
    def model_ids(self) -> list[str]:
        return [m.id for m in self.models]

    @property
    def default_model_id(self) -> str:
        return self.default_model or self.models[0].id

    def model(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)


class EnvSettings(BaseSettings):
    """The environment variables the application reads (and nothing else reads any)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    standin_dir: str | None = Field(default=None, validation_alias="STANDIN_DIR")
    hf_hub_offline: bool = Field(default=False, validation_alias="HF_HUB_OFFLINE")
    cache_admin_token: SecretStr | None = Field(default=None, validation_alias="CACHE_ADMIN_TOKEN")
    api_keys: SecretStr | None = Field(default=None, validation_alias="API_KEYS")
    admin_api_keys: SecretStr | None = Field(default=None, validation_alias="ADMIN_API_KEYS")
    rate_limit: str | None = Field(default=None, validation_alias="RATE_LIMIT")
    cpu_isa_max: Literal["avx2", "avx512", "avx512_vnni"] | None = Field(
        default=None,
        validation_alias="CPU_ISA_MAX",
        description="Pick and name CPU kernels as if the CPU had no instruction set above this "
        "(`serve_app.models.device.cpu_flags`), e.g. to measure the AVX2 path on an AVX-512 "
        "machine. Caps only the service's choice: the libraries are capped by their own "
        "variables (`device.library_isa_env`).",
    )

    @field_validator("cpu_isa_max", mode="before")
    @classmethod
    def _lower_isa(cls, value: object) -> object:
        return value.strip().lower() or None if isinstance(value, str) else value


def parse_keys(text: str, admin: bool = False) -> list[ApiKey]:
    """Env API_KEYS / ADMIN_API_KEYS: comma-separated `key` or `name=key` entries (a bare key
    is named `key-` and the first 8 hex digits of its SHA-256)."""
    keys = []
    for entry in (e.strip() for e in text.split(",")):
        if entry:
            name, sep, secret = entry.partition("=")
            keys.append(
                ApiKey.from_secret(secret, name.strip(), admin)
                if sep
                else ApiKey.from_secret(entry, admin=admin)
            )
    return keys


def _resolve_access(args: AppArgs, env: EnvSettings) -> AccessOptions:
    keys = list(args.access.api_keys)
    if env.api_keys:
        keys += parse_keys(env.api_keys.get_secret_value())
    if env.admin_api_keys:
        keys += parse_keys(env.admin_api_keys.get_secret_value(), admin=True)
    token = env.cache_admin_token or args.cache.admin_token  # the older name of an admin key
    if token:
        keys.append(ApiKey.from_secret(token.get_secret_value(), "cache-admin", admin=True))
    rate = RateLimit.parse(env.rate_limit) if env.rate_limit else args.access.rate_limit
    return AccessOptions(api_keys=keys, rate_limit=rate)


def resolve_args(args: AppArgs, env: EnvSettings | None = None) -> AppArgs:
    """Apply environment overrides to the YAML args and fill in machine-specific defaults."""
    env = env or EnvSettings()
    updates: dict[str, object] = {}
    if env.redis_url:
        updates["redis_url"] = env.redis_url
    if env.database_url:
        updates["database_url"] = env.database_url
    if env.hf_hub_offline:
        updates["offline"] = True
    if env.cache_admin_token:
        updates["cache"] = args.cache.model_copy(update={"admin_token": env.cache_admin_token})
    updates["access"] = _resolve_access(args, env)
    standin_dir = env.standin_dir or args.standin_dir
    updates["standin_dir"] = str(
        Path(standin_dir or Path.home() / ".cache" / "serve-gpt2" / "standins")
        .expanduser()
        .resolve()
    )
    resolved = args.model_copy(update=updates)
    if resolved.multi_node:
        require_shared_services(resolved)
    return resolved


class MissingSharedServiceError(ValueError):
    """A multi-node app was deployed without the Redis or PostgreSQL every node must share."""


def require_shared_services(args: AppArgs) -> None:
    missing = []
    if args.needs_redis and not args.redis_url:
        missing.append("REDIS_URL (a Redis every node reaches: shared cache and rate limits)")
    if not args.database_url.startswith("postgresql"):
        missing.append(
            "DATABASE_URL naming PostgreSQL (postgresql+asyncpg://...); a SQLite file is one "
            f"node's, got {args.database_url.split('://', 1)[0]}://..."
        )
    if missing:
        raise MissingSharedServiceError(
            "multi_node is set, so these must be set in the environment of `ray start` on "
            "every node (or in the app's runtime_env.env_vars, or in args:): " + "; ".join(missing)
        )
