"""GET /healthz's verdict from its parts' reports."""

from serve_app.http.health import readiness

OK = {"status": "ok"}
DOWN = {"status": "unavailable", "error": "unreachable"}


def test_all_up_is_ok():
    assert readiness({"redis": OK, "database": OK, "generator": OK}) == (
        200,
        {"status": "ok", "redis": OK, "database": OK, "generator": OK},
    )


def test_redis_down_is_degraded_but_ready():
    status, body = readiness({"redis": DOWN, "database": OK, "generator": OK})
    assert status == 200 and body["status"] == "degraded" and body["down"] == ["redis"]
    assert readiness({"redis": {"status": "disabled"}, "database": OK, "generator": OK})[0] == 200


def test_generator_or_database_down_is_not_ready():
    for down in ("database", "generator"):
        parts = {"redis": OK, "database": OK, "generator": OK, down: DOWN}
        status, body = readiness(parts)
        assert status == 503 and body["status"] == "unavailable" and body["down"] == [down]
