"""The body cap: a 413 in the usual error shape before the body is parsed, declared or not."""

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from serve_app.http.errors import install_error_handlers
from serve_app.http.limits import BodyLimit, limit_body


class Body(BaseModel):
    text: str


def make_client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    limit_body(app, 2048)

    @app.post("/echo")
    async def echo(body: Body) -> dict:
        return {"length": len(body.text)}

    @app.post("/v1/echo")
    async def echo_openai(body: Body) -> dict:
        return {"length": len(body.text)}

    return TestClient(app, raise_server_exceptions=False)


def chunks():  # no Content-Length: the cap is checked as the body arrives
    yield b'{"text": "'
    for _ in range(10):
        yield b"y" * 512
    yield b'"}'


def test_bodies_over_the_cap_are_refused_declared_or_chunked():
    client = make_client()
    assert client.post("/echo", json={"text": "x" * 100}).json() == {"length": 100}
    for r in (
        client.post("/echo", json={"text": "x" * 4096}),
        client.post("/echo", content=chunks(), headers={"content-type": "application/json"}),
    ):
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["type"] == "payload_too_large" and "2048 bytes" in error["message"]
    r = client.post("/v1/echo", json={"text": "x" * 4096})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
