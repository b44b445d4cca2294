"""Fail fast at start: database URLs that cannot work are refused with one clear line."""

from __future__ import annotations

import pytest

from serve_app.storage.persistence import Persistence
from serve_app.storage.preflight import (
    DatabaseConfigError,
    check_database,
    check_database_url,
    safe_url,
)
from tests.conftest import free_port


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("not a url", "not a database URL"),
        ("nosuchdb+driver://h/db", "no SQLAlchemy dialect"),
        ("sqlite:///data/x.db", "is not async"),
        ("mysql+aiomysql://u:secret@127.0.0.1/db", "is not installed (pip install aiomysql)"),
        ("sqlite+aiosqlite:////etc/hostname/x.db", "is not a directory"),
    ],
)
def test_unusable_urls_are_refused_by_name(url, words):
    with pytest.raises(DatabaseConfigError) as refused:
        check_database_url(url)
    message = str(refused.value)
    assert words in message and "\n" not in message
    assert "secret" not in message


def test_usable_urls_pass(tmp_path):
    check_database_url(f"sqlite+aiosqlite:///{tmp_path}/new/dir/app.db")  # made at start
    check_database_url("postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def test_passwords_never_show():
    assert "hunter2" not in safe_url("postgresql+asyncpg://u:hunter2@h/db")


async def test_a_database_that_does_not_answer_stops_the_replica(caplog):
    url = f"postgresql+asyncpg://u:hunter2@127.0.0.1:{free_port()}/db"
    cls = Persistence.func_or_class
    with pytest.raises(RuntimeError) as stopped:
        await cls.__new__(cls).__init__(url)
    line = str(stopped.value)
    assert line.startswith("database postgresql+asyncpg://u:***@127.0.0.1:")
    assert "unusable at start-up" in line and "hunter2" not in line and "\n" not in line
    assert any(r.getMessage() == line for r in caplog.records)


def test_the_build_check_connects_to_a_server():
    url = f"postgresql+asyncpg://u:hunter2@127.0.0.1:{free_port()}/db"
    with pytest.raises(DatabaseConfigError) as refused:
        check_database(url, timeout_s=5)
    assert "unusable at start-up" in str(refused.value) and "hunter2" not in str(refused.value)
