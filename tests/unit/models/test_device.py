"""Where a model runs (serve_app/models/device.py): every choice and refusal, without a GPU.

The GPU side is driven by what a replica would see (Ray's GPU ids, whether torch finds CUDA),
so the choice is tested on a machine that has none; nothing here runs on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.config import AppArgs, ModelSpec
from serve_app.errors import ModelUnavailableError
from serve_app.models.device import (
    AMX_INT8_MIN_ROWS,
    choose_placement,
    cpu_flags,
    cpu_isa,
    int8_engine,
    library_isa_env,
    local_placement,
    missing_native_bf16,
    planned_kernel,
)

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
VNNI = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}
SAPPHIRE = VNNI | {"avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}
SAPPHIRE_CPUINFO = f"processor\t: 0\nflags\t\t: {' '.join(sorted(SAPPHIRE))}\n"


def spec(**kwargs) -> ModelSpec:
    return ModelSpec(**{"id": "m", "architecture": "tiny", **kwargs})


def test_cpu_flags_are_read_from_cpuinfo_text():
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\nbugs\t\t: spectre\n"
    assert cpu_flags(text) == {"fpu", "sse", "avx2", "fma"}
    assert cpu_flags("processor : 0\n") == frozenset()


@pytest.mark.parametrize(
    ("flags", "isa", "engine"),
    [
        (AVX2, "AVX2", "fbgemm"),
        (VNNI, "AVX-512 VNNI", "x86"),
        (SAPPHIRE, "AMX", "fbgemm <8 rows, onednn >=8 rows"),
    ],
)
def test_int8_kernels_are_named_by_the_cpu(flags, isa, engine):
    assert cpu_isa(flags) == isa and int8_engine(flags).name == engine
    placement = choose_placement(spec(dtype="int8"), [], False, flags)
    assert placement == placement.__class__("cpu", "int8", f"{engine} int8 ({isa})")


def test_amx_splits_int8_linears_by_rows_and_other_cpus_keep_one_engine():
    amx = int8_engine(SAPPHIRE)
    assert (amx.few_rows, amx.many_rows, amx.min_rows) == ("fbgemm", "onednn", AMX_INT8_MIN_ROWS)
    assert amx.split and 1 < amx.min_rows <= 32  # one user on fbgemm, 32 users on oneDNN
    for flags in (AVX2, VNNI):
        engines = int8_engine(flags)
        assert not engines.split and engines.few_rows == engines.many_rows
    assert int8_engine(AVX2).few_rows == "fbgemm"  # the measured AVX2 choice, unchanged


def test_float32_is_the_exact_default_on_the_cpu():
    placement = choose_placement(spec(), [], False, AVX2)
    assert (placement.device, placement.dtype, placement.kernel) == (
        "cpu",
        "float32",
        "oneDNN float32 (AVX2)",
    )
    assert choose_placement(spec(kernels="stock"), [], False, AVX2).kernel == "stock float32 (AVX2)"


def test_bfloat16_is_refused_without_native_bf16_naming_the_feature():
    with pytest.raises(ModelUnavailableError) as err:
        choose_placement(spec(dtype="bfloat16"), [], False, VNNI)
    assert "avx512_bf16" in err.value.message and "AVX-512 VNNI" in err.value.message
    assert "int8" in err.value.message  # what to use instead
    assert choose_placement(spec(dtype="bfloat16"), [], False, SAPPHIRE).dtype == "bfloat16"
    amx_only = AVX2 | {"amx_bf16"}
    assert choose_placement(spec(dtype="bfloat16"), [], False, amx_only).dtype == "bfloat16"


def test_auto_uses_the_gpu_ray_assigned_else_the_cpu():
    on_gpu = choose_placement(spec(dtype="float16"), ["0"], True, AVX2)
    assert (on_gpu.device, on_gpu.dtype, on_gpu.kernel) == ("cuda", "float16", "cuda float16")
    assert choose_placement(spec(dtype="int8"), [], True, AVX2).device == "cpu"  # no GPU assigned
    # int8 here is the CPU's dynamic quantization; a GPU replica runs the model in float16.
    assert choose_placement(spec(dtype="int8"), ["0"], True, AVX2).dtype == "float16"
    assert choose_placement(spec(device="cpu"), ["0"], True, AVX2).device == "cpu"


@pytest.mark.parametrize(
    ("gpu_ids", "cuda", "reason"),
    [([], False, "assigned this replica no GPU"), (["0"], False, "torch sees no CUDA device")],
)
def test_cuda_asked_for_and_absent_is_a_clear_error(gpu_ids, cuda, reason):
    with pytest.raises(ModelUnavailableError) as err:
        choose_placement(spec(device="cuda"), gpu_ids, cuda, AVX2)
    assert reason in err.value.message and "'m'" in err.value.message


def test_float16_is_a_gpu_dtype():
    with pytest.raises(ValidationError, match="float16 needs a GPU"):
        spec(dtype="float16", device="cpu")
    # auto without a GPU: the exact CPU path, named as such.
    cpu = choose_placement(spec(dtype="float16"), [], False, AVX2)
    assert (cpu.device, cpu.dtype, cpu.kernel) == ("cpu", "float32", "oneDNN float32 (AVX2)")


def test_the_gpu_config_gives_the_generator_a_gpu_and_cuda_models():
    """configs/gpu.yaml: the Generator asks Ray for one GPU; with it every model runs on CUDA,
    without it (a CPU-only node) on the CPU path."""
    import yaml

    root = Path(__file__).resolve().parents[3]
    config = yaml.safe_load((root / "configs" / "gpu.yaml").read_text())
    app = config["applications"][0]
    generator = next(d for d in app["deployments"] if d["name"] == "Generator")
    assert generator["ray_actor_options"]["num_gpus"] == 1
    models = AppArgs.model_validate(app["args"]).models
    assert {choose_placement(m, ["0"], True, AVX2).device for m in models} == {"cuda"}
    assert {choose_placement(m, [], False, AVX2).device for m in models} == {"cpu"}


def test_this_machine_without_a_gpu_refuses_cuda_at_start_up(tmp_path):
    """What a replica does at start-up (`prepare_model` -> `local_placement`) on this GPU-less
    machine: device cuda fails with the reason; auto runs on the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelUnavailableError, match="device cuda"):
        local_placement(spec(device="cuda"))
    assert local_placement(spec(dtype="int8")).device == "cpu"
    from serve_app.models.resolve import prepare_model

    with pytest.raises(ModelUnavailableError, match="device cuda"):
        prepare_model(spec(id="g", device="cuda"), tmp_path, 1.0, offline=True)


def test_int8_dynamic_is_a_deprecated_alias_of_int8():
    with pytest.warns(FutureWarning, match="int8-dynamic"):
        assert spec(dtype="int8-dynamic").dtype == "int8"
    with pytest.raises(ValidationError):
        spec(dtype="int4")
    args = AppArgs.model_validate({"models": [{"id": "a", "dtype": "int8", "device": "cpu"}]})
    assert args.models[0].device == "cpu"


def test_models_endpoint_names_the_planned_kernels():
    assert planned_kernel(spec(dtype="int8", device="cpu"), AVX2) == "fbgemm int8 (AVX2)"
    assert planned_kernel(spec(dtype="int8"), AVX2) == (
        "fbgemm int8 (AVX2); cuda float16 on a GPU replica"
    )
    assert planned_kernel(spec(device="cuda", dtype="float16"), AVX2) == "cuda float16"
    refused = planned_kernel(spec(dtype="bfloat16", device="cpu"), AVX2)
    assert refused.startswith("refused on this CPU") and "avx512_bf16" in refused


@pytest.mark.parametrize(
    ("cap", "isa", "engine"),
    [
        ("avx2", "AVX2", "fbgemm"),
        ("avx512", "AVX-512", "fbgemm"),
        (" AVX512_VNNI ", "AVX-512 VNNI", "x86"),
        ("", "AMX", "fbgemm <8 rows, onednn >=8 rows"),
    ],
)
def test_cpu_isa_max_caps_the_kernels_the_service_picks_and_names(monkeypatch, cap, isa, engine):
    """Env CPU_ISA_MAX: an AMX machine picks, and GET /models names, a smaller CPU's kernels."""
    monkeypatch.setenv("CPU_ISA_MAX", cap)
    flags = cpu_flags(SAPPHIRE_CPUINFO)
    assert cpu_isa(flags) == isa and int8_engine(flags).name == engine
    assert planned_kernel(spec(dtype="int8", device="cpu"), flags) == f"{engine} int8 ({isa})"
    assert (missing_native_bf16(flags) is None) == (isa == "AMX")  # no bf16 below the cap
    assert cpu_flags(SAPPHIRE_CPUINFO, capped=False) == SAPPHIRE  # what benchmarks print


def test_an_unknown_cpu_isa_max_is_refused(monkeypatch):
    monkeypatch.setenv("CPU_ISA_MAX", "avx9")
    with pytest.raises(ValidationError, match="CPU_ISA_MAX"):
        cpu_flags(SAPPHIRE_CPUINFO)


def test_the_library_caps_reach_pytorch():
    """`library_isa_env` as the benchmarks' `--isa avx2` sets it: a fresh process's PyTorch
    runs its AVX2 kernels (AVX-512 ones unused even where the CPU has them)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **library_isa_env("avx2")}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "AVX2"
    assert env["CPU_ISA_MAX"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
