"""Where a model runs and with which kernels: pure decisions, no torch import.

A replica learns at start-up which device each model gets (`choose_placement`), from the
model's `device` and `dtype`, what Ray assigned it (a GPU or not) and the CPU's feature flags.
Everything a machine cannot do well is refused here with a message naming what is missing,
before any weight is read: bfloat16 without native bf16 arithmetic (avx512_bf16 or AMX) runs
about 10x slower than float32 on an AVX2 CPU, and a model asked to run on CUDA without a GPU
would otherwise quietly crawl on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from serve_app.config import EnvSettings, ModelSpec
from serve_app.errors import ModelUnavailableError

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (as /proc/cpuinfo spells them) that give bfloat16 matmuls native arithmetic."""


@dataclass(frozen=True)
class Placement:
    """Where one model runs, and the kernels it gets there (named at start-up and in
    `GET /models`)."""

    device: str  # "cpu" or "cuda"
    dtype: str
    kernel: str


def cpu_flags(cpuinfo: str | None = None, *, capped: bool = True) -> frozenset[str]:
    """The CPU's feature flags, from /proc/cpuinfo (Linux x86); `capped`: without those above
    env `CPU_ISA_MAX` (`capped_flags`), as every kernel choice sees them. Empty when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    flags: list[str] = []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = value.split()
            break
    return capped_flags(flags, EnvSettings().cpu_isa_max if capped else None)


ISA_CAPS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx512", "avx_vnni", "amx", "avx10"),
    "avx512": ("avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx", "avx10"),
    "avx512_vnni": ("avx512_bf16", "avx512_fp16", "amx", "avx10"),
}
"""The values env `CPU_ISA_MAX` takes, and the prefixes of the flags each one hides."""


def capped_flags(flags: Iterable[str], isa_max: str | None) -> frozenset[str]:
    """`flags` without the instruction sets above `isa_max` (a key of `ISA_CAPS`, or None)."""
    if isa_max is None:
        return frozenset(flags)
    above = ISA_CAPS[isa_max]
    return frozenset(f for f in flags if not f.startswith(above))


def library_isa_env(isa_max: str) -> dict[str, str]:
    """The environment that caps the int8 and float32 libraries at `isa_max`, as `CPU_ISA_MAX`
    caps the service's own choice: PyTorch's vectorised ops, fbgemm, oneDNN, MKL and
    CTranslate2. Each library reads its variable once, at its first use in a process: set them
    before the process starts (Ray workers inherit the environment of `serve run`)."""
    aten, fbgemm, onednn, mkl, ct2 = {
        "avx2": ("avx2", "AVX2", "AVX2", "AVX2", "AVX2"),
        "avx512": ("avx512", "AVX512", "AVX512_CORE", "AVX512", "AVX512"),
        "avx512_vnni": ("avx512", "AVX512_E1", "AVX512_CORE_VNNI", "AVX512_E1", "AVX512"),
    }[isa_max]
    return {
        "CPU_ISA_MAX": isa_max,
        "ATEN_CPU_CAPABILITY": aten,
        "FBGEMM_ENABLE_INSTRUCTIONS": fbgemm,
        "ONEDNN_MAX_CPU_ISA": onednn,
        "MKL_ENABLE_INSTRUCTIONS": mkl,
        "CT2_FORCE_CPU_ISA": ct2,
    }


def cpu_isa(flags: Iterable[str]) -> str:
    """The best int8-relevant instruction set among `flags`, as kernels are named by it."""
    flags = set(flags)
    if "amx_int8" in flags:
        return "AMX"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx512bw" in flags:
        return "AVX-512"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    if "avx2" in flags:
        return "AVX2"
    return "generic"


def reported_flags(flags: Iterable[str]) -> list[str]:
    """The flags worth printing beside a benchmark figure (SIMD width, int8 and bf16 support)."""
    wanted = ("avx2", "fma", "avx512", "avx_vnni", "amx")
    return sorted(f for f in flags if f.startswith(wanted))


@dataclass(frozen=True)
class Int8Engines:
    """The kernels that run a dynamic int8 linear, by the rows (tokens) it multiplies: `few_rows`
    below `min_rows`, `many_rows` from there on. One `torch.backends.quantized` engine when both
    are the same; `fbgemm` and `onednn` packs each int8 weight twice (`int8.SplitInt8Linear`)."""

    few_rows: str
    many_rows: str
    min_rows: int = 0

    @property
    def split(self) -> bool:
        return self.few_rows != self.many_rows

    @property
    def name(self) -> str:
        if not self.split:
            return self.few_rows
        return f"{self.few_rows} <{self.min_rows} rows, {self.many_rows} >={self.min_rows} rows"


AMX_INT8_MIN_ROWS = 8
"""Rows from which oneDNN's AMX int8 matmul beats fbgemm's on the 124M model: measured on a
2-vCPU Sapphire Rapids (amx_int8, avx512_vnni), all 49 linears with distinct weights, ms per
pass, fbgemm vs oneDNN (`int8.SplitInt8Linear`'s op): 6.3 vs 8.0 at 1 row, 9.7 vs 8.7 at 8,
13.8 vs 9.8 at 16, 17.8 vs 13.1 at 32, 167 vs 84 at 384 (a prefill). `x86` ran these dynamic
linears as fbgemm did."""


def int8_engine(flags: Iterable[str]) -> Int8Engines:
    """The engines for dynamic int8 linears on this CPU.

    AVX2 without VNNI: `fbgemm`, measured fastest on the 124M model (see `docs/benchmarks.md`).
    AMX: fbgemm for a decode step of a few rows (bound by reading the weights, where oneDNN is
    slower) and oneDNN, which dispatches AMX (`brg_matmul:avx10_1_512_amx`), from
    `AMX_INT8_MIN_ROWS` on. AVX-512 VNNI without AMX: `x86` (it ran as fbgemm); oneDNN
    limited to VNNI (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI` on the same CPU) lost to fbgemm up
    to 32 rows and won only prefills (128 vs 165 ms at 384 rows)."""
    isa = cpu_isa(flags)
    if isa == "AMX":
        return Int8Engines("fbgemm", "onednn", AMX_INT8_MIN_ROWS)
    engine = "x86" if isa == "AVX-512 VNNI" else "fbgemm"
    return Int8Engines(engine, engine)


def missing_native_bf16(flags: Iterable[str]) -> str | None:
    """Why bfloat16 is refused on this CPU, or None when it has native bf16."""
    flags = set(flags)
    if flags.intersection(NATIVE_BF16_FLAGS):
        return None
    return (
        f"this CPU has no native bfloat16 ({' or '.join(NATIVE_BF16_FLAGS)} missing; it has "
        f"{cpu_isa(flags)}): bfloat16 would run about 10x slower than float32. Use dtype int8 "
        "(fast on any x86 CPU) or float32"
    )


def choose_placement(
    spec: ModelSpec, gpu_ids: Iterable[str | int], cuda_available: bool, flags: Iterable[str]
) -> Placement:
    """The device and kernels of `spec` on a replica that Ray gave `gpu_ids` (empty: none),
    where torch sees CUDA or not. `auto` takes the GPU when there is one; without one it runs
    the CPU path (float16, a GPU dtype, as float32; int8 on a GPU as float16, since dynamic
    int8 is a CPU kernel). Raises `ModelUnavailableError` with the reason when the model
    cannot run here as configured."""
    gpus = list(gpu_ids)
    has_gpu = bool(gpus) and cuda_available
    if spec.device == "cuda" and not has_gpu:
        why = (
            "Ray assigned this replica no GPU (set num_gpus: 1 on the Generator, e.g. "
            "configs/gpu.yaml)"
            if not gpus
            else "torch sees no CUDA device (a CPU-only torch build, or no driver)"
        )
        raise ModelUnavailableError(
            f"model {spec.id!r} has device cuda, but {why}", model=spec.id, reason="no_gpu"
        )
    if spec.device != "cpu" and has_gpu:
        dtype = "float16" if spec.dtype == "int8" else spec.dtype
        return Placement("cuda", dtype, f"cuda {dtype}")
    flags = frozenset(flags)
    if spec.dtype == "float16":  # a GPU dtype: a replica without one runs the exact CPU path
        spec = spec.model_copy(update={"dtype": "float32"})
    if spec.dtype == "bfloat16" and (why := missing_native_bf16(flags)):
        raise ModelUnavailableError(
            f"model {spec.id!r}: dtype bfloat16 refused: {why}", model=spec.id, reason="no_bf16"
        )
    isa = cpu_isa(flags)
    if spec.dtype == "int8":
        return Placement("cpu", "int8", f"{int8_engine(flags).name} int8 ({isa})")
    kernels = "oneDNN" if spec.kernels == "onednn" else "stock"
    return Placement("cpu", spec.dtype, f"{kernels} {spec.dtype} ({isa})")


def local_placement(spec: ModelSpec) -> Placement:
    """`choose_placement` for this process: the GPUs Ray assigned this actor (outside Ray,
    any GPU torch sees) and this machine's CPU flags. Imports torch."""
    import torch

    cuda = torch.cuda.is_available()
    try:
        import ray

        in_ray = ray.is_initialized()
        gpu_ids = ray.get_gpu_ids() if in_ray else []
    except Exception:  # no Ray installed or no worker context
        in_ray, gpu_ids = False, []
    if not in_ray and cuda:
        gpu_ids = [str(i) for i in range(torch.cuda.device_count())]
    return choose_placement(spec, gpu_ids, cuda, cpu_flags())


def planned_kernel(spec: ModelSpec, flags: Iterable[str]) -> str:
    """What `GET /models` names before any replica has loaded `spec`: the CPU kernels this
    machine would use, and the CUDA ones where the device asks for a GPU."""
    cuda = f"cuda {'float16' if spec.dtype == 'int8' else spec.dtype}"
    if spec.device == "cuda":
        return cuda
    try:
        cpu = choose_placement(spec.model_copy(update={"device": "cpu"}), [], False, flags)
    except (ModelUnavailableError, ValueError) as exc:
        cpu_kernel = "refused on this CPU"
        if spec.device == "cpu":
            return f"{cpu_kernel}: {getattr(exc, 'message', exc)}"
        return f"{cuda} on a GPU replica; {cpu_kernel}"
    if spec.device == "auto":
        return f"{cpu.kernel}; {cuda} on a GPU replica"
    return cpu.kernel
