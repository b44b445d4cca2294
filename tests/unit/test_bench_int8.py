"""The int8 benchmark's CTranslate2 baseline (`loadtests/bench_int8.py`) runs in a child
process of its own: a round trip gives a well-formed measurement, the child gets this process's
ISA caps, and no process is left behind, whether it is closed or dies. No timing is asserted:
the tiny stand-in is converted and run for real."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest

from loadtests.bench_int8 import Ct2Model
from serve_app.models.device import cpu_flags, library_isa_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("ctranslate2") is None, reason="ctranslate2 (dev extra) missing"
    ),
]

NEW_TOKENS = 4


@pytest.fixture
def ct2_env(tmp_path_factory, monkeypatch) -> Path:
    """A private stand-in dir, and the AVX2 cap `--isa avx2` sets where the CPU has AVX2 (the
    cap only, harmless to CTranslate2, elsewhere). Returns the conversion dir."""
    root = tmp_path_factory.getbasetemp() / "ct2-bench"
    monkeypatch.setenv("STANDIN_DIR", str(root / "standins"))
    cap = library_isa_env("avx2")
    if "avx2" not in cpu_flags(capped=False):
        cap = {"CPU_ISA_MAX": cap["CPU_ISA_MAX"]}
    for key, value in cap.items():
        monkeypatch.setenv(key, value)
    return root / "ct2"


def start(workdir: Path) -> Ct2Model:
    return Ct2Model(
        NEW_TOKENS,
        1,
        workdir,
        lambda rng: f"the river {rng.randrange(1000)} runs",
        lambda: [0] * 8,
        lambda before, after: 0.25,
        architecture="tiny",
    )


def gone(pid: int) -> bool:
    """No process, not even a zombie: the parent reaped it."""
    return not Path(f"/proc/{pid}").exists()


def test_ct2_child_measures_with_the_parents_caps_and_exits_when_closed(ct2_env) -> None:
    ct2 = start(ct2_env)
    try:
        assert ct2.pid != os.getpid() and not gone(ct2.pid)
        # The point of the child: CTranslate2's OpenMP runtime never loads in this process.
        assert "ctranslate2" not in sys.modules
        result = ct2.measure_one(3, 2)
        assert ct2.isa_env == {k: os.environ.get(k) for k in library_isa_env("avx2")}
        assert ct2.isa_env["CPU_ISA_MAX"] == "avx2"
    finally:
        code = ct2.close()
    assert "int8" in ct2.compute_type
    assert result["kernels"] == f"ctranslate2 {ct2.compute_type}"
    assert result["latency_s"] > 0
    assert result["tok_s"] == pytest.approx(3 * NEW_TOKENS / result["latency_s"])
    assert result["steal"] == 0.25
    assert code == 0 and gone(ct2.pid)
    assert ct2.close() == 0  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        ct2.measure_one(1, 1)


def test_a_dead_ct2_child_is_an_error_not_a_hang(ct2_env) -> None:
    ct2 = start(ct2_env)
    try:
        os.kill(ct2.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="exited with code -9"):
            ct2.measure_one(1, 1)
    finally:
        ct2.close()
    assert gone(ct2.pid)
