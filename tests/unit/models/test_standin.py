"""Stand-in checkpoints: built for real (tiny size) under a temporary root, then loaded back
with transformers exactly as the generator loads them."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from serve_app.errors import ModelUnavailableError
from serve_app.models.standin import (
    ARCHITECTURES,
    MARKER_FILE,
    STANDIN_VERSION,
    ensure_standin,
    standin_revision,
)

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces , odd   spacing ;\n\nnew paragraphs\tand tabs  ",
    "Numbers 0 1 2 3.14159 -42 1e10 (100%) $5 #tag @user a_b c-d 'quoted' \"double\"",
    "Punctuation: ~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/ and <|endoftext|> written in text.",
    "zxqv qqqq WWW xyzzy Supercalifragilisticexpialidocious",
]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("standins")
    ensure_standin("tiny", 0, None, root)
    return root


def logits_of(path: Path) -> torch.Tensor:
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    ids = torch.arange(0, 2000, 97).unsqueeze(0)
    with torch.inference_mode():
        return model(ids).logits


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_standin_is_a_small_loadable_gpt2(tiny_root):
    path = ensure_standin("tiny", 0, None, tiny_root)

    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size < 5 * 2**20, f"tiny stand-in is {size / 2**20:.1f} MiB"
    model = GPT2LMHeadModel.from_pretrained(path)
    assert type(model) is GPT2LMHeadModel
    tiny = ARCHITECTURES["tiny"]
    assert model.config.model_type == "gpt2"
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (2, 64, 2)
    assert model.config.n_positions == tiny["n_positions"] == 512
    assert model.config.vocab_size == tiny["vocab_size"] == 4096
    assert next(model.parameters()).dtype == torch.float32
    assert (path / "model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.is_fast
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == model.config.bos_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == 4096
    assert tokenizer.model_max_length == 512

    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker == {
        "arch": "tiny",
        "seed": 0,
        "n_layer": 2,
        "version": STANDIN_VERSION,
        "revision": standin_revision("tiny", 0, None),
        "tokenizer_vocab_size": 4096,
        "model_vocab_size": 4096,
    }


def test_tokenizer_roundtrips_text_within_the_vocabulary(tiny_root):
    tokenizer = AutoTokenizer.from_pretrained(ensure_standin("tiny", 0, None, tiny_root))
    for text in [*TEXTS, "Unicode too: café, naïve, 東京, 🙂"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids and max(ids) < 4096
        assert tokenizer.decode(ids) == text
    # Real merges were learned: common words are one token, not one per byte.
    assert len(tokenizer.encode(" the", add_special_tokens=False)) == 1
    assert len(tokenizer.encode(TEXTS[0], add_special_tokens=False)) < len(TEXTS[0]) / 2


def test_same_seed_rebuilds_bit_identical_and_other_seeds_differ(tiny_root, tmp_path):
    first = ensure_standin("tiny", 0, None, tiny_root)
    again = ensure_standin("tiny", 0, None, tmp_path)  # an independent build from scratch
    other = ensure_standin("tiny", 1, None, tiny_root)

    assert again.name == first.name and again != first
    assert sha256(again / "tokenizer.json") == sha256(first / "tokenizer.json")
    assert sha256(again / "model.safetensors") == sha256(first / "model.safetensors")
    assert torch.equal(logits_of(first), logits_of(again))

    assert other != first
    assert not torch.allclose(logits_of(first), logits_of(other))
    # Stand-ins of one vocabulary share the tokenizer, trained once per root.
    assert sha256(other / "tokenizer.json") == sha256(first / "tokenizer.json")
    assert len(list((tiny_root / "tokenizers").iterdir())) == 1


def test_second_call_returns_the_existing_build(tiny_root):
    path = ensure_standin("tiny", 0, None, tiny_root)
    marker_mtime = (path / MARKER_FILE).stat().st_mtime_ns
    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns

    assert ensure_standin("tiny", 0, None, tiny_root) == path
    assert ensure_standin("tiny", 0, 2, tiny_root) == path  # n_layer=2 is tiny's default

    assert (path / MARKER_FILE).stat().st_mtime_ns == marker_mtime
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert not [p for p in tiny_root.iterdir() if ".tmp-" in p.name]


def test_incomplete_directory_is_rebuilt(tmp_path):
    path = ensure_standin("tiny", 3, None, tmp_path)
    (path / MARKER_FILE).unlink()  # e.g. a copy interrupted half-way
    (path / "model.safetensors").write_bytes(b"truncated")

    assert ensure_standin("tiny", 3, None, tmp_path) == path
    assert (path / MARKER_FILE).is_file()
    assert GPT2LMHeadModel.from_pretrained(path).config.n_layer == 2


def test_n_layer_override_builds_a_different_standin(tiny_root):
    path = ensure_standin("tiny", 0, 1, tiny_root)
    assert path != ensure_standin("tiny", 0, None, tiny_root)
    model = GPT2LMHeadModel.from_pretrained(path)
    assert model.config.n_layer == 1 and len(model.transformer.h) == 1


def test_revision_names_the_weights():
    assert standin_revision("gpt2", 0, None) == f"standin-v{STANDIN_VERSION}:gpt2:s0:L12"
    assert standin_revision("gpt2", 0, 12) == standin_revision("gpt2", 0, None)
    revisions = {
        standin_revision("gpt2", 0, None),
        standin_revision("gpt2", 1, None),
        standin_revision("gpt2", 0, 6),
        standin_revision("distilgpt2", 0, None),
        standin_revision("tiny", 0, None),
    }
    assert len(revisions) == 5


@pytest.mark.parametrize(("arch", "n_layer"), [("gpt3", None), ("tiny", 0)])
def test_invalid_architecture_is_refused(tmp_path, arch, n_layer):
    with pytest.raises(ModelUnavailableError):
        ensure_standin(arch, 0, n_layer, tmp_path)
    assert not list(tmp_path.iterdir())


def _build_in_child(root: str, barrier, results) -> None:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log = logging.getLogger("ray.serve.serve_app.models.standin")
    log.setLevel(logging.INFO)
    log.addHandler(Collect())
    barrier.wait()  # both processes start building at the same moment
    path = ensure_standin("tiny", 7, None, Path(root))
    results.put((str(path), sum(m.startswith("built stand-in") for m in messages)))


def test_concurrent_builders_produce_one_valid_directory(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_build_in_child, args=(str(tmp_path), barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    paths = {path for path, _ in outcomes}
    assert len(paths) == 1
    assert sum(builds for _, builds in outcomes) == 1, "the lock must let only one build"
    path = Path(paths.pop())
    assert json.loads((path / MARKER_FILE).read_text())["seed"] == 7
    assert GPT2LMHeadModel.from_pretrained(path).config.vocab_size == 4096
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        path.name,
        "tokenizers",
    ]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_full_size_gpt2_standin(tmp_path):
    path = ensure_standin("gpt2", 0, None, tmp_path)

    marker = json.loads((path / MARKER_FILE).read_text())
    assert 48_000 <= marker["tokenizer_vocab_size"] <= 50257
    model = GPT2LMHeadModel.from_pretrained(path)
    assert 124_000_000 < model.num_parameters() < 125_000_000  # GPT-2 small: 124.4M
    assert model.config.n_positions == 1024
    tokenizer = AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert max(ids) < min(model.config.vocab_size, len(tokenizer))
        assert tokenizer.decode(ids) == text
