"""Configuration: validation of the YAML args and the environment overrides."""

import pytest
from pydantic import ValidationError

from serve_app.config import AppArgs, EnvSettings, MissingSharedServiceError, resolve_args


class TestConfig:
    def test_model_ids_unique(self):
        with pytest.raises(ValidationError):
            AppArgs(models=[{"id": "a"}, {"id": "a"}])

    def test_default_model_must_exist(self):
        with pytest.raises(ValidationError):
            AppArgs(models=[{"id": "a"}], default_model="b")
        assert AppArgs(models=[{"id": "a"}, {"id": "b"}]).default_model_id == "a"

    def test_unknown_keys_rejected(self):
        with pytest.raises(ValidationError):
            AppArgs.model_validate({"models": [{"id": "a"}], "typo": 1})

    def test_env_overrides_yaml(self, monkeypatch, tmp_path):
        monkeypatch.setenv("REDIS_URL", "redis://example:1/0")
        monkeypatch.setenv("DATABASE_URL", "sqlite+aiosqlite:///x.db")
        monkeypatch.setenv("STANDIN_DIR", str(tmp_path))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        args = resolve_args(AppArgs(models=[{"id": "a"}], redis_url="redis://yaml:2/0"))
        assert args.redis_url == "redis://example:1/0"
        assert args.database_url == "sqlite+aiosqlite:///x.db"
        assert args.standin_dir == str(tmp_path.resolve())
        assert args.offline is True

    def test_no_env_keeps_yaml(self, monkeypatch):
        for name in ("REDIS_URL", "DATABASE_URL", "STANDIN_DIR", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        args = resolve_args(AppArgs(models=[{"id": "a"}]), EnvSettings())
        assert args.redis_url is None and args.offline is False
        assert args.standin_dir.endswith("standins")


class TestMultiNode:
    """A multi-node app refuses to start without the services every node must share."""

    def test_missing_redis_and_sqlite_are_named(self) -> None:
        args = AppArgs(models=[{"id": "a"}], multi_node=True)
        with pytest.raises(MissingSharedServiceError) as err:
            resolve_args(args, EnvSettings())
        message = str(err.value)
        assert "REDIS_URL" in message and "DATABASE_URL naming PostgreSQL" in message
        assert "sqlite+aiosqlite://..." in message  # the scheme, never the path

    def test_environment_supplies_both(self) -> None:
        env = EnvSettings(
            REDIS_URL="redis://redis.internal:6379/0",
            DATABASE_URL="postgresql+asyncpg://u@db.internal/gens",
        )
        args = resolve_args(AppArgs(models=[{"id": "a"}], multi_node=True), env)
        assert args.redis_url == "redis://redis.internal:6379/0"

    def test_a_cache_switched_off_needs_no_redis(self) -> None:
        env = EnvSettings(DATABASE_URL="postgresql+asyncpg://u@db/gens")
        args = AppArgs(models=[{"id": "a"}], multi_node=True, cache={"enabled": False})
        assert resolve_args(args, env).redis_url is None
