"""`python -m serve_app.storage`: the migrate and purge commands, on real databases."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from sqlalchemy import insert

from serve_app.domain import new_id
from serve_app.storage.cli import main
from serve_app.storage.migrations import head_revision
from serve_app.storage.store import Store
from serve_app.storage.tables import GenerationRow, to_values
from tests.unit.storage.rows import make_row

ROOT = Path(__file__).resolve().parents[3]


async def _seed(url: str, ages_days: list[float]) -> None:
    store = Store(url)
    await store.start()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = [
        to_values(make_row(i), new_id(), now - timedelta(days=age))
        for i, age in enumerate(ages_days)
    ]
    try:
        async with store.engine.begin() as conn:
            await conn.execute(insert(GenerationRow), rows)
    finally:
        await store.close()


async def _count(url: str) -> int:
    store = Store(url)
    await store.start()
    try:
        return await store.count()
    finally:
        await store.close()


def test_upgrade_and_current(store_url: str, capsys) -> None:
    assert main(["--database-url", store_url, "upgrade"]) == 0
    assert main(["--database-url", store_url, "current"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(f"schema at revision {head_revision()}")
    assert out[1].endswith(f"schema at revision {head_revision()}")


def test_purge_with_an_explicit_age(store_url: str, capsys) -> None:
    asyncio.run(_seed(store_url, [40, 35, 31, 10, 0]))
    assert main(["--database-url", store_url, "purge", "--older-than-days", "30"]) == 0
    assert "deleted 3 records" in capsys.readouterr().out
    assert asyncio.run(_count(store_url)) == 2


def test_purge_uses_the_configs_retention_and_database(tmp_path: Path) -> None:
    """Run as an operator would: from the serve directory, with the Serve config file."""
    spec = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    spec["applications"][0]["args"]["persistence"] = {"retention_days": 7}
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(spec))
    url = f"sqlite+aiosqlite:///{tmp_path}/data/tiny.db"  # the config's relative path
    asyncio.run(_seed(url, [8, 7.5, 6, 1]))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.storage", "purge"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "deleted 2 records" in done.stdout
    assert asyncio.run(_count(url)) == 2


def test_purge_without_an_age_is_a_usage_error(tmp_path: Path, capsys) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/x.db"
    with pytest.raises(SystemExit) as exc:
        main(["--database-url", url, "purge"])
    assert exc.value.code == 2
    assert "older-than-days" in capsys.readouterr().err


def test_current_does_not_create_a_sqlite_file(tmp_path: Path, capsys) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/x.db"
    assert main(["--database-url", url, "current"]) == 0
    assert capsys.readouterr().out.strip().endswith("schema at revision none")
    assert not (tmp_path / "no").exists()


def test_an_unreachable_database_is_a_clean_error(capsys) -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/nothing"  # nothing listens on port 1
    assert main(["--database-url", url, "upgrade"]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "Traceback" not in err
