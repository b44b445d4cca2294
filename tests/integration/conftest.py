"""Fixtures shared by the modules that drive the session app (`tiny_app`)."""

import pytest
import redis


@pytest.fixture(scope="module")
def client(tiny_app):
    with tiny_app.client() as c:
        yield c


@pytest.fixture(scope="module")
def rds(tiny_app):
    """A client of the session app's own redis-server."""
    r = redis.Redis.from_url(tiny_app.redis_url)
    yield r
    r.close()
