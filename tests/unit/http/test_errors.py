"""The one error mapper: every failure a route raises leaves as JSON with X-Response-Time."""

import json

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from serve_app.errors import PromptTooLongError, UnknownModelError
from serve_app.http.errors import install_error_handlers, sse_error


class WrappedError(Exception):
    """Stands for how Ray re-raises a replica's exception: the original is on `.cause`."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def make_client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret path /etc/passwd")

    @app.get("/wrapped")
    async def wrapped() -> None:
        raise WrappedError(PromptTooLongError("too long", limit=512))

    @app.get("/v1/wrapped")
    async def wrapped_openai() -> None:
        raise WrappedError(PromptTooLongError("too long", limit=512))

    @app.get("/v1/model")
    async def unknown_model() -> None:
        raise UnknownModelError("unknown model 'x'", valid_ids=["a"])

    @app.get("/v1/boom")
    async def boom_openai() -> None:
        raise RuntimeError("secret path /etc/passwd")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            yield b"one "
            yield b"two"

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/broken-stream")
    async def broken_stream() -> StreamingResponse:
        async def chunks():
            yield b"one "
            raise RuntimeError("secret path /etc/passwd")

        return StreamingResponse(chunks(), media_type="text/plain")

    return TestClient(app, raise_server_exceptions=False)


def test_unexpected_error_is_a_json_500_without_internals():
    r = make_client().get("/boom")
    assert r.status_code == 500
    assert r.json() == {"error": {"type": "internal_error", "message": "internal server error"}}
    assert "x-response-time" in r.headers


def test_wrapped_serve_error_keeps_its_status_and_details():
    r = make_client().get("/wrapped")
    assert r.status_code == 400
    assert r.json()["error"] == {"type": "prompt_too_long", "message": "too long", "limit": 512}
    assert "x-response-time" in r.headers


def test_openai_routes_answer_in_openai_shape():
    client = make_client()
    r = client.get("/v1/wrapped")
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": None,
            "code": "context_length_exceeded",
        }
    }
    r = client.get("/v1/model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.get("/v1/boom")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "passwd" not in r.text


def test_a_stream_is_timed_and_passes_whole():
    r = make_client().get("/stream")
    assert r.status_code == 200 and r.text == "one two"
    assert r.headers["x-response-time"].endswith("ms")


def test_an_error_after_the_answer_started_ends_it_without_a_second_answer():
    # The status line has gone: a JSON 500 now would be a second answer on one request.
    with pytest.raises(RuntimeError, match="secret path"):  # the route's own error, re-raised
        TestClient(make_client().app).get("/broken-stream")


def test_an_error_after_a_stream_started_is_its_last_event():
    frame = sse_error(WrappedError(PromptTooLongError("too long", limit=512)), openai=True)
    assert frame.startswith("data: ") and frame.endswith("\n\n")
    body = json.loads(frame[len("data: ") :])
    assert body["error"]["code"] == "context_length_exceeded"
    plain = json.loads(sse_error(RuntimeError("/secret/path"), openai=False)[len("data: ") :])
    assert plain == {"error": {"type": "internal_error", "message": "internal server error"}}
