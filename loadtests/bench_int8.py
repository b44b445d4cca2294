"""The int8 part of `make bench`: the CTranslate2 baseline, accuracy and memory.

- `Ct2Model`: CTranslate2 (a dev dependency) with the stand-in converted to int8 by its own
  transformers converter, offline, timed with `generate_batch` (greedy, exactly N new tokens,
  the same prompts as the service gets), in a child process of its own. It is what a CPU user
  who wants speed picks today; `bench_batching` pairs it with the service's `gpt2-int8` windows
  at 1 and 32 users.
- `accuracy`: int8 against float32 logits at every position of a fixed text set
  (`loadtests/texts/accuracy.txt`): relative error and top-1 agreement.
- `memory`: resident memory of a fresh process that loads one model, per dtype, as a
  Generator replica does: the whole process, and what loading the model added to it.

Runnable alone: `python loadtests/bench_int8.py [--isa avx2]` prints accuracy and memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ROOT / "loadtests" / "texts" / "accuracy.txt"


def cpu_description() -> dict:
    """The CPU model and the flags that decide the kernels, for every printed figure."""
    from serve_app.models.device import cpu_flags, cpu_isa, reported_flags

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    return {
        "model": model,
        "cores": os.cpu_count(),
        "isa": cpu_isa(flags),
        "flags": reported_flags(cpu_flags(capped=False)),  # the real CPU's, under a cap too
        "isa_max": os.environ.get("CPU_ISA_MAX"),
    }


def cap_isa(isa_max: str | None) -> None:
    """Emulate a CPU without the instruction sets above `isa_max` (`--isa`): this process, the
    service it starts and CTranslate2 all get `device.library_isa_env(isa_max)`. Must run
    before torch or ctranslate2 are imported, since each library reads its variable once."""
    if not isa_max:
        return
    loaded = [m for m in ("torch", "ctranslate2") if m in sys.modules]
    if loaded:
        raise RuntimeError(f"--isa must be applied before {' and '.join(loaded)} is imported")
    from serve_app.models.device import library_isa_env

    os.environ.update(library_isa_env(isa_max))


def _standin(dtype: str = "float32"):
    """The bench's gpt2 stand-in (configs/bench.yaml's `gpt2`), loaded as the service does."""
    from serve_app.config import AppArgs, ModelSpec, resolve_args
    from serve_app.models.loading import load_model
    from serve_app.models.resolve import prepare_model

    spec = ModelSpec(id=f"gpt2-{dtype}", architecture="gpt2", seed=0, dtype=dtype)
    standin_dir = Path(resolve_args(AppArgs(models=[spec])).standin_dir)
    info = prepare_model(spec, standin_dir, 1.0, True)
    return load_model(spec, info, standin_dir)


_CT2_WORKER = """
import sys
sys.path.insert(0, sys.argv[1])
from loadtests.bench_int8 import _ct2_serve
_ct2_serve(sys.argv[2])
"""


def _ct2_serve(config: str) -> None:
    """The CTranslate2 process: convert (once, cached in `workdir`) and load the stand-in, say
    so on the protocol pipe, then time one `generate_batch` per request line until EOF.

    Requests are `{"prompts": [...], "n": N}`, answers `{"elapsed_s": s}`: one JSON line each.
    Between requests it blocks reading stdin, so its OpenMP threads sleep through the
    service's windows."""
    import signal

    # Ctrl-C reaches the whole process group: the parent answers it by closing the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol keeps the real stdout; anything a library prints goes to stderr instead.
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    import ctranslate2
    from transformers import AutoTokenizer

    from serve_app.config import AppArgs, ModelSpec, resolve_args
    from serve_app.models.device import library_isa_env
    from serve_app.models.resolve import prepare_model

    cfg = json.loads(config)
    spec = ModelSpec(id="gpt2", architecture=cfg["architecture"], seed=0)
    info = prepare_model(spec, Path(resolve_args(AppArgs(models=[spec])).standin_dir), 1, True)
    target = Path(cfg["workdir"]) / f"ct2-{info.revision.replace(':', '-')}-int8"
    if not (target / "model.bin").exists():
        converter = ctranslate2.converters.TransformersConverter(info.location)
        tmp = target.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        converter.convert(str(tmp), quantization="int8", force=True)
        tmp.rename(target)
    tokenizer = AutoTokenizer.from_pretrained(info.location)
    generator = ctranslate2.Generator(
        str(target), device="cpu", compute_type="int8", intra_threads=cfg["threads"]
    )
    # What this process got of `cap_isa`'s environment, for the parent to print and check.
    isa_env = {k: os.environ.get(k) for k in library_isa_env("avx2")}
    ready = {"compute_type": generator.compute_type, "isa_env": isa_env}
    reply.write(json.dumps(ready) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        n = request["n"]
        prompts = [tokenizer.convert_ids_to_tokens(tokenizer.encode(p)) for p in request["prompts"]]
        started = time.perf_counter()
        results = generator.generate_batch(
            prompts, max_length=n, min_length=n, sampling_topk=1, include_prompt_in_result=False
        )
        elapsed = time.perf_counter() - started
        lengths = {len(r.sequences_ids[0]) for r in results}
        if lengths != {n}:
            raise RuntimeError(f"asked for {n} new tokens, CTranslate2 gave {sorted(lengths)}")
        reply.write(json.dumps({"elapsed_s": elapsed}) + "\n")


class Ct2Model:
    """CTranslate2 int8 on the same stand-in, with `measure_one` shaped like `RawModel`'s.

    CTranslate2 runs in a child process of its own. In the benchmark's process its OpenMP
    threads (libgomp, a second runtime and thread team beside torch's), the torch model and the
    load generator could disturb one another: there, its batch-32 baseline moved between 644
    and 790 tok/s from one pair to the next. The child inherits the environment, so `cap_isa`
    reaches it (checked at start); it answers on a pipe and sleeps between requests. `close()`
    (or `with`) stops it; it also exits on end of file when this process dies. Raises
    `ImportError` without ctranslate2, without importing it here."""

    def __init__(
        self,
        new_tokens: int,
        threads: int,
        workdir: Path,
        make_prompt,
        cpu_ticks,
        steal_share,
        architecture: str = "gpt2",
    ) -> None:
        if importlib.util.find_spec("ctranslate2") is None:
            raise ImportError("ctranslate2 is not installed")
        self.new_tokens = new_tokens
        self.make_prompt = make_prompt
        self._ticks, self._steal = cpu_ticks, steal_share
        self.rng = random.Random(0)
        config = {"architecture": architecture, "threads": threads, "workdir": str(workdir)}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CT2_WORKER, str(ROOT), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self._proc.pid
        try:
            ready = self._receive()
            self.compute_type: str = ready["compute_type"]
            self.isa_env: dict[str, str | None] = ready["isa_env"]
            if self.isa_env != {k: os.environ.get(k) for k in self.isa_env}:
                raise RuntimeError(f"the CTranslate2 process got ISA caps {self.isa_env}")
            self.run(1, 4)  # warm-up
        except BaseException:
            self.close()
            raise

    def _receive(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"the CTranslate2 process exited with code {code} (stderr above)")
        return json.loads(line)

    def run(self, batch: int, n: int) -> float:
        if self._proc.stdin.closed:
            raise RuntimeError("the CTranslate2 process was closed")
        prompts = [self.make_prompt(self.rng) for _ in range(batch)]
        try:
            self._proc.stdin.write(json.dumps({"prompts": prompts, "n": n}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: `_receive` reports its exit code
        return self._receive()["elapsed_s"]

    def measure_one(self, batch: int, reps: int) -> dict:
        ticks = self._ticks()
        latency = statistics.median(self.run(batch, self.new_tokens) for _ in range(reps))
        return {
            "latency_s": latency,
            "tok_s": batch * self.new_tokens / latency,
            "kernels": f"ctranslate2 {self.compute_type}",
            "steal": self._steal(ticks, self._ticks()),
        }

    def close(self, timeout_s: float = 30.0) -> int:
        """Stop the child (end of file on its stdin; SIGKILL after `timeout_s`) and return its
        exit code. Safe to call twice."""
        if not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        return self._proc.returncode

    def __enter__(self) -> Ct2Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def accuracy(texts: Path = TEXTS) -> dict:
    """int8 against float32 logits at every position of every line of `texts`."""
    import torch

    fp32, int8 = _standin("float32"), _standin("int8")
    errors, agree, positions = [], 0, 0
    with torch.inference_mode():
        for line in texts.read_text().splitlines():
            if not line.strip():
                continue
            ids = torch.tensor([fp32.tokenizer.encode(line)[: fp32.n_positions]])
            ref = fp32.model(ids).logits.float()[0]
            got = int8.model(ids).logits.float()[0]
            errors.extend(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist())
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            positions += ids.shape[1]
    return {
        "texts": texts.name,
        "positions": positions,
        "sensitivity": _sensitivity(fp32, texts),
        "rel_error_median": statistics.median(errors),
        "rel_error_max": max(errors),
        "top1_agreement": agree / positions,
    }


def _sensitivity(fp32, texts: Path, noise: float = 1e-3) -> dict:
    """How far float32 logits move when only the token embedding gets gaussian noise of
    `noise` x its std: a random-weight stand-in (init std 0.2) amplifies any perturbation,
    so this control says how much of int8's error is the stand-in's and not int8's."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(fp32.info.location).eval()
    ref_model = GPT2LMHeadModel.from_pretrained(fp32.info.location).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = model.transformer.wte.weight
        model.transformer.wte.weight = torch.nn.Parameter(
            w + torch.randn(w.shape, generator=gen) * w.std() * noise
        )
    errors, agree, positions = [], 0, 0
    with torch.inference_mode():
        for line in texts.read_text().splitlines():
            if line.strip():
                ids = torch.tensor([fp32.tokenizer.encode(line)[: fp32.n_positions]])
                ref, got = ref_model(ids).logits[0], model(ids).logits[0]
                errors.extend(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist())
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                positions += ids.shape[1]
    return {
        "noise": noise,
        "rel_error_median": statistics.median(errors),
        "top1_agreement": agree / positions,
    }


_MEMORY_PROBE = """
import gc, json, sys, torch, transformers
sys.path.insert(0, sys.argv[2])
from loadtests.bench_int8 import _standin, _rss
torch.set_num_threads(1)
before = _rss()
loaded = _standin(sys.argv[1])
gc.collect()
from serve_app.models.int8 import resident_bytes
print(json.dumps({"rss_before": before, "rss": _rss(), "weights": resident_bytes(loaded.model)}))
"""


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(dtypes: tuple[str, ...] = ("float32", "int8")) -> dict:
    """Per dtype: RSS of a fresh process holding just that model, RSS the load added, and the
    bytes of its weights. `model_ratio` is int8 / float32 of what the load added."""
    out: dict = {}
    for dtype in dtypes:
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, dtype, str(ROOT)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out[dtype] = {
            "process_rss_mb": r["rss"] / 2**20,
            "model_rss_mb": (r["rss"] - r["rss_before"]) / 2**20,
            "weights_mb": r["weights"] / 2**20,
        }
    if "float32" in out and "int8" in out:
        f, i = out["float32"], out["int8"]
        out["model_ratio"] = i["model_rss_mb"] / f["model_rss_mb"]
        out["process_ratio"] = i["process_rss_mb"] / f["process_rss_mb"]
    return out


INT8_TARGETS = {32: ("tok_ratio", ">=", 0.90), 1: ("p50_ratio", "<=", 1.20)}
"""The issue's targets against CTranslate2 int8: tok/s at 32 users, p50 latency at 1 user."""


def int8_checks(pairs: dict, acc: dict | None, mem: dict | None) -> list[tuple]:
    """(name, value, target, ok) lines of the report: the paired CTranslate2 ratios (median
    pair), the memory ratio, and accuracy (report only)."""
    out = []
    for users, (key, op, bound) in INT8_TARGETS.items():
        rows = pairs.get(users)
        if rows:
            value = statistics.median(p[key] for p in rows)
            ok = value >= bound if op == ">=" else value <= bound
            what = "tok/s" if key == "tok_ratio" else "p50"
            name = f"{users} users: gpt2-int8 {what} / CTranslate2 int8 b{users} (paired)"
            out.append((name, value, f"{op} {bound}", ok))
    if mem and "model_ratio" in mem:
        ratio = mem["model_ratio"]
        out.append(("memory: int8 / float32 RSS the model added", ratio, "<= 0.45", ratio <= 0.45))
        out.append(("memory: int8 / float32 process RSS", mem["process_ratio"], "report", True))
    if acc:
        out.append(
            ("accuracy: int8 top-1 agreement with float32", acc["top1_agreement"], "report", True)
        )
    return out


def print_int8_report(acc: dict | None, mem: dict | None) -> None:
    if acc:
        print(
            f"\naccuracy, int8 vs float32 logits ({acc['positions']} positions of "
            f"{acc['texts']}): relative error median {acc['rel_error_median']:.4f}, "
            f"max {acc['rel_error_max']:.4f}; top-1 agreement {acc['top1_agreement']:.3f}"
        )
        sens = acc.get("sensitivity")
        if sens:
            print(
                f"  control: float32 with {sens['noise']:g} x std noise on the embedding only: "
                f"relative error {sens['rel_error_median']:.4f}, top-1 agreement "
                f"{sens['top1_agreement']:.3f} (how much this model amplifies a perturbation)"
            )
    if mem:
        print("\nmemory per replica | process RSS MB | RSS the model added MB | weights MB")
        for dtype in ("float32", "int8"):
            m = mem.get(dtype)
            if m:
                print(
                    f"{dtype:<18} | {m['process_rss_mb']:>14.0f} | {m['model_rss_mb']:>22.0f} | "
                    f"{m['weights_mb']:>10.0f}"
                )


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(ROOT))
    from serve_app.models.device import ISA_CAPS

    parser = argparse.ArgumentParser(description="int8 accuracy and memory against float32")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), help="as bench_batching.py --isa")
    cap_isa(parser.parse_args().isa)
    print(json.dumps(cpu_description()))
    result_acc, result_mem = accuracy(), memory()
    print_int8_report(result_acc, result_mem)
    print(json.dumps({"accuracy": result_acc, "memory": result_mem}, indent=2))
