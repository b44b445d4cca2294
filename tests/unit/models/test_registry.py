"""Model resolution and loading against real directories: stand-ins built for real, a
`save_pretrained` checkpoint, a Hugging Face cache laid out on disk as huggingface_hub lays
it out, and a hub endpoint that refuses connections."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from huggingface_hub import constants as hf_constants
from transformers import AutoTokenizer, GPT2LMHeadModel

from serve_app.config import ModelSpec
from serve_app.errors import ModelUnavailableError
from serve_app.models import resolve as registry
from serve_app.models.device import cpu_flags, planned_kernel
from serve_app.models.loading import LoadedModel, load_model
from serve_app.models.resolve import resolve_model
from serve_app.models.standin import ensure_standin, standin_revision

FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"
ONLINE_SHA = "89abcdef0123456789abcdef0123456789abcdef"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def point_hub_at(monkeypatch, endpoint: str) -> None:
    # huggingface_hub derives these from HF_ENDPOINT at import time.
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hf_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path, monkeypatch) -> Iterator[Path]:
    """An empty Hugging Face cache and a hub that refuses connections, whatever the machine
    has. huggingface_hub reads HF_HOME at import, so its constants are pointed there too."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    point_hub_at(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    registry.clear_resolution_cache()
    yield home / "hub"
    registry.clear_resolution_cache()


@pytest.fixture
def hub_server(monkeypatch, tiny_checkpoint) -> Iterator[list[str]]:
    """A hub endpoint on loopback that knows one repository, `acme/online-gpt2`, and answers
    the two calls resolution makes (model info, config.json). Yields the paths requested."""
    requested: list[str] = []
    config = (tiny_checkpoint / "config.json").read_bytes()
    model_info = json.dumps(
        {
            "id": "acme/online-gpt2",
            "sha": ONLINE_SHA,
            "config": {"model_type": "gpt2"},
            "siblings": [
                {"rfilename": name}
                for name in ("config.json", "model.safetensors", "tokenizer.json")
            ],
        }
    ).encode()
    routes = {
        "/api/models/acme/online-gpt2": model_info,
        f"/acme/online-gpt2/resolve/{ONLINE_SHA}/config.json": config,
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            requested.append(path)
            body = routes.get(path)
            self.send_response(200 if body else 404)
            body = body or b'{"error": "Repository not found"}'
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def standin_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("standins")
    ensure_standin("tiny", 0, None, root)
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(standin_root, tmp_path_factory) -> Path:
    """A real `save_pretrained` directory, as a user's fine-tuned checkpoint would be."""
    source = ensure_standin("tiny", 5, None, standin_root)
    out = tmp_path_factory.mktemp("checkpoint") / "my-gpt2"
    GPT2LMHeadModel.from_pretrained(source).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def spec(**kwargs) -> ModelSpec:
    return ModelSpec(**{"id": "m", "architecture": "tiny", **kwargs})


def logits(loaded: LoadedModel, ids: list[int] | None = None) -> torch.Tensor:
    ids = ids or loaded.tokenizer.encode("Hello, world! The fox.", add_special_tokens=False)
    with torch.inference_mode():
        return loaded.model(torch.tensor([ids])).logits.float()


def test_no_source_serves_the_standin_without_warning(standin_root):
    info = resolve_model(spec(source=None), standin_root, 1.0, offline=False)

    assert info.kind == "standin" and not info.real_weights
    assert info.warning is None
    assert info.revision == standin_revision("tiny", 0, None)
    assert info.architecture == "tiny" and info.n_positions == 512
    assert Path(info.location) == ensure_standin("tiny", 0, None, standin_root)
    assert info.to_public() == {
        "id": "m",
        "source": None,
        "kind": "standin",
        "real_weights": False,
        "revision": standin_revision("tiny", 0, None),
        "architecture": "tiny",
        "dtype": "float32",
        "device": "auto",
        "kernel": planned_kernel(spec(source=None), cpu_flags()),
        "warning": None,
    }
    assert info.kernel.startswith(("oneDNN float32", "stock float32"))


def test_revision_differs_across_seeds_and_layers(standin_root):
    revisions = {
        resolve_model(spec(seed=seed, n_layer=n), standin_root, 1.0, offline=True).revision
        for seed, n in [(0, None), (1, None), (0, 1)]
    }
    assert len(revisions) == 3


def test_local_checkpoint_is_served_with_real_weights(tiny_checkpoint, standin_root):
    info = resolve_model(spec(source=str(tiny_checkpoint)), standin_root, 1.0, offline=True)

    assert info.kind == "local" and info.real_weights and info.warning is None
    assert info.location == str(tiny_checkpoint)
    assert info.revision.startswith("local-")
    assert info.architecture == "tiny" and info.n_positions == 512
    assert "location" not in info.to_public()

    loaded = load_model(spec(source=str(tiny_checkpoint)), info, standin_root)
    assert loaded.info == info
    reference = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    with torch.inference_mode():
        ids = torch.tensor([[1, 2, 3, 400]])
        # oneDNN kernels (the default) sum in another order than the reference's MKL
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


def test_local_revision_changes_when_the_weights_change(tiny_checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    before = registry.local_revision(copy)
    assert registry.local_revision(copy) == before
    weights = copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert registry.local_revision(copy) != before


@pytest.mark.parametrize("offline", [True, False])
def test_unreachable_hub_model_falls_back_to_a_loud_standin(standin_root, caplog, offline):
    with caplog.at_level(logging.WARNING, logger="ray.serve.serve_app.models.resolve"):
        info = resolve_model(spec(source="gpt2", seed=2), standin_root, 2.0, offline=offline)

    assert info.kind == "standin" and not info.real_weights
    assert info.source == "gpt2"
    assert info.revision == standin_revision("tiny", 2, None)
    assert info.warning and "'gpt2'" in info.warning and "RANDOM-WEIGHT stand-in" in info.warning
    assert info.to_public()["warning"] == info.warning
    logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(logged) == 1 and "STAND-IN SERVED FOR MODEL 'm'" in logged[0].getMessage()


def test_unavailable_source_without_standin_is_refused(standin_root):
    registry.clear_resolution_cache()
    with pytest.raises(ModelUnavailableError) as err:
        resolve_model(spec(source="gpt2", allow_standin=False), standin_root, 1.0, False)
    assert err.value.status_code == 503 and "'gpt2'" in err.value.message
    for source in ("./no/such/dir", "/no/such/abs/dir"):
        registry.clear_resolution_cache()
        with pytest.raises(ModelUnavailableError) as err:
            resolve_model(spec(source=source, allow_standin=False), standin_root, 1.0, False)
        assert err.value.status_code == 503 and "local checkpoint" in err.value.message
        assert "no/such" not in err.value.message  # error bodies never show server paths


def test_what_clients_see_of_a_local_source_has_no_path(tiny_checkpoint, standin_root, tmp_path):
    secret = tmp_path / "secret-place"
    (secret / "empty").mkdir(parents=True)
    fallback = resolve_model(spec(source=str(secret / "empty")), standin_root, 1.0, True)
    served = resolve_model(spec(source=str(tiny_checkpoint)), standin_root, 1.0, True)
    for info in (fallback, served):
        public = json.dumps(info.to_public())
        assert "secret-place" not in public and str(tiny_checkpoint) not in public
        assert info.to_public()["source"] is None
    assert "local checkpoint" in fallback.warning


def test_hub_model_is_asked_online_with_its_commit(standin_root, hub_server):
    info = resolve_model(spec(source="acme/online-gpt2"), standin_root, 2.0, offline=False)

    assert info.kind == "hub" and info.real_weights and info.warning is None
    assert info.location == "acme/online-gpt2" and info.revision == ONLINE_SHA
    assert info.architecture == "tiny" and info.n_positions == 512
    assert hub_server == [
        "/api/models/acme/online-gpt2",
        f"/acme/online-gpt2/resolve/{ONLINE_SHA}/config.json",
    ]


def test_unknown_hub_model_falls_back(standin_root, hub_server):
    info = resolve_model(spec(source="acme/nope"), standin_root, 2.0, offline=False)
    assert info.kind == "standin" and "the hub could not be asked" in info.warning
    assert hub_server == ["/api/models/acme/nope"]


def test_offline_and_path_like_sources_never_reach_the_hub(standin_root, hub_server):
    for source in ("./no/such/dir", "/no/such/abs/dir", "../x", "~/nowhere"):
        info = resolve_model(spec(source=source), standin_root, 1.0, offline=False)
        assert info.kind == "standin"
        assert "local directory does not exist" in info.warning
    info = resolve_model(spec(source="acme/online-gpt2"), standin_root, 1.0, offline=True)
    assert info.kind == "standin" and "offline" in info.warning
    assert hub_server == []


def test_directory_that_is_not_a_checkpoint_falls_back(standin_root, tmp_path):
    (tmp_path / "empty").mkdir()
    info = resolve_model(spec(source=str(tmp_path / "empty")), standin_root, 1.0, offline=True)
    assert info.kind == "standin" and "config.json" in info.warning


def test_hub_model_in_the_local_cache_is_served_offline(
    tiny_checkpoint, standin_root, isolated_hub
):
    # The layout huggingface_hub writes: refs/main names the snapshot of the main commit.
    repo = isolated_hub / "models--acme--tiny-gpt2"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / FAKE_SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_SHA)
    model_spec = spec(source="acme/tiny-gpt2")

    info = resolve_model(model_spec, standin_root, 1.0, offline=True)
    assert info.kind == "hub" and info.real_weights and info.warning is None
    assert info.location == "acme/tiny-gpt2" and info.revision == FAKE_SHA
    assert info.n_positions == 512 and info.architecture == "tiny"

    loaded = load_model(model_spec, info, standin_root)
    assert loaded.info.kind == "hub"
    reference = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    with torch.inference_mode():
        ids = torch.tensor([[5, 6, 7]])
        # oneDNN kernels (the default) sum in another order than the reference's MKL
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


def test_load_failure_is_reported_and_forgotten(
    tiny_checkpoint, standin_root, isolated_hub, monkeypatch
):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    snapshot = isolated_hub / "models--acme--flaky" / "snapshots" / FAKE_SHA
    shutil.copytree(tiny_checkpoint, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(FAKE_SHA)
    model_spec = spec(source="acme/flaky")
    info = resolve_model(model_spec, standin_root, 1.0, offline=True)
    assert info.kind == "hub"

    (snapshot / "model.safetensors").write_bytes(b"corrupted")
    with pytest.raises(ModelUnavailableError) as err:
        load_model(model_spec, info, standin_root)
    assert err.value.status_code == 503 and "'acme/flaky'" in err.value.message
    assert str(isolated_hub) not in err.value.message

    # The failed resolution is not reused: the source is examined again (and is now unusable).
    (snapshot / "model.safetensors").unlink()
    again = resolve_model(model_spec, standin_root, 1.0, offline=True)
    assert again.kind == "standin" and "incomplete" in again.warning


def test_loaded_standin_is_ready_for_inference(standin_root):
    model_spec = spec()
    loaded = load_model(
        model_spec, resolve_model(model_spec, standin_root, 1.0, True), standin_root
    )

    assert isinstance(loaded.model, GPT2LMHeadModel) and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.eos_token_id == loaded.tokenizer.eos_token_id == loaded.tokenizer.pad_token_id
    assert loaded.vocab_limit == 4096 and loaded.n_positions == 512
    ids = loaded.tokenizer.encode("The quick brown fox, again and again.")
    assert max(ids) < loaded.vocab_limit
    assert loaded.tokenizer.decode(ids) == "The quick brown fox, again and again."


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_reduced_precision_stays_close_to_float32(standin_root, dtype, monkeypatch):
    from serve_app.models import device

    # bfloat16 loads only where the CPU has native bf16: pretend it has (the tiny model's
    # emulated bf16 is fast enough for a test).
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    reference = load_model(spec(), resolve_model(spec(), standin_root, 1.0, True), standin_root)
    model_spec = spec(dtype=dtype)
    info = resolve_model(model_spec, standin_root, 1.0, True)
    loaded = load_model(model_spec, info, standin_root)
    assert loaded.info.dtype == dtype

    if dtype == "bfloat16":
        assert next(loaded.model.parameters()).dtype == torch.bfloat16
    else:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
        from transformers.pytorch_utils import Conv1D

        from serve_app.models.int8 import SplitInt8Linear

        modules = list(loaded.model.modules())
        assert not any(isinstance(m, Conv1D) for m in modules)
        # 4 projections per block (qkv, attention out, MLP in, MLP out) plus lm_head.
        int8 = (DynamicQuantizedLinear, SplitInt8Linear)
        assert sum(isinstance(m, int8) for m in modules) == 4 * 2 + 1
        # No float32 matrix stays: only layer norms, biases and position embeddings.
        assert max(p.numel() for p in loaded.model.parameters()) <= 512 * 64
        assert loaded.placement.kernel.endswith(f"int8 ({device.cpu_isa(device.cpu_flags())})")

    ref, out = logits(reference), logits(loaded)
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.1
    with torch.inference_mode():  # the KV-cache path the generator takes
        generated = loaded.model.generate(
            torch.tensor([[10, 20, 30]]), max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    assert generated.shape == (1, 8)


def test_resolutions_are_memoised_per_offline_flag(standin_root, tiny_checkpoint, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, source)
    model_spec = spec(source=str(source))
    first = resolve_model(model_spec, standin_root, 1.0, offline=True)
    shutil.rmtree(source)  # gone, but a resolution this recent is reused
    assert resolve_model(model_spec, standin_root, 1.0, offline=True) is first
    assert resolve_model(model_spec, standin_root, 1.0, offline=False).kind == "standin"
    registry.clear_resolution_cache()
    assert resolve_model(model_spec, standin_root, 1.0, offline=True).kind == "standin"


def test_prepare_builds_the_standin_once_and_only_for_standins(standin_root, tiny_checkpoint):
    from serve_app.models.resolve import prepare_model

    spec = ModelSpec(id="p", architecture="tiny", seed=11)
    info = prepare_model(spec, standin_root, hub_timeout_s=1.0, offline=True)
    assert info.kind == "standin"
    assert (Path(info.location) / "standin.json").exists()
    before = {p.name for p in standin_root.iterdir()}
    local = ModelSpec(id="l", source=str(tiny_checkpoint), architecture="tiny", seed=99)
    assert prepare_model(local, standin_root, hub_timeout_s=1.0, offline=True).kind == "local"
    assert {p.name for p in standin_root.iterdir()} == before  # nothing built for a real model


def test_bfloat16_without_native_cpu_support_is_refused_naming_the_feature(
    standin_root, monkeypatch
):
    """An AVX2 CPU would run bfloat16 about 10x slower than float32: loading refuses, and the
    message names the missing CPU feature, before any weight is read."""
    from serve_app.models import device

    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(registry, "cpu_flags", device.cpu_flags)
    registry.clear_resolution_cache()
    model_spec = spec(dtype="bfloat16")
    info = resolve_model(model_spec, standin_root, 1.0, True)
    assert "refused on this CPU" in info.kernel
    with pytest.raises(ModelUnavailableError) as err:
        load_model(model_spec, info, standin_root)
    assert "avx512_bf16" in err.value.message and "amx_bf16" in err.value.message
    assert "AVX2" in err.value.message


def test_a_local_checkpoint_that_fails_to_load_is_named_without_its_path(
    tiny_checkpoint, standin_root, tmp_path
):
    copy = tmp_path / "private-dir"
    shutil.copytree(tiny_checkpoint, copy)
    model_spec = spec(source=str(copy))
    info = resolve_model(model_spec, standin_root, 1.0, offline=True)
    (copy / "model.safetensors").write_bytes(b"corrupted")
    with pytest.raises(ModelUnavailableError) as err:
        load_model(model_spec, info, standin_root)
    assert "local checkpoint" in err.value.message and "private-dir" not in err.value.message
