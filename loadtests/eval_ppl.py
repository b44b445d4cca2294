"""Perplexity of a model on a text file, in each dtype: what int8 costs on your weights.

    make eval-ppl MODEL=gpt2 TEXT=my.txt                 # hub id (cached or reachable)
    make eval-ppl MODEL=/models/gpt2-finetuned TEXT=...  # a local save_pretrained directory
    make eval-ppl MODEL=standin:gpt2                     # the random-weight stand-in

The model is loaded exactly as the service loads it (`serve_app.models.loading`), once per
dtype (`--dtypes`, default float32 and int8). The text is tokenized whole and scored in
windows of the model's context with half a context of overlap, each token predicted once
with at least half a context before it (the usual sliding-window perplexity). Prints one
line per dtype and the ratio to float32; `--out` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load(model: str, dtype: str):
    from serve_app.config import AppArgs, ModelSpec, resolve_args
    from serve_app.models.loading import load_model
    from serve_app.models.resolve import prepare_model

    if model.startswith("standin:"):
        spec = ModelSpec(id="eval", architecture=model.split(":", 1)[1], dtype=dtype)
    else:
        spec = ModelSpec(id="eval", source=model, dtype=dtype, allow_standin=False)
    args = resolve_args(AppArgs(models=[spec]))
    standin_dir = Path(args.standin_dir)
    info = prepare_model(spec, standin_dir, args.hub_timeout_s, args.offline)
    return load_model(spec, info, standin_dir)


def perplexity(loaded, ids: list[int], window: int | None = None) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over `ids` and how many tokens were scored."""
    import torch

    window = window or loaded.n_positions
    stride = max(1, window // 2)
    device = loaded.device
    nll, scored, done = 0.0, 0, 1  # the first token has no context: never scored
    with torch.inference_mode():
        while done < len(ids):
            end = min(done + stride, len(ids))
            start = max(0, end - window)
            chunk = torch.tensor([ids[start:end]], device=device)
            logits = loaded.model(chunk).logits.float()[0]
            targets = chunk[0, done - start :]
            logp = logits[done - start - 1 : end - start - 1].log_softmax(-1)
            nll -= float(logp.gather(1, targets.unsqueeze(1)).sum())
            scored += len(targets)
            done = end
    return math.exp(nll / scored), scored


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="standin:gpt2", help="hub id, local dir or standin:ARCH")
    parser.add_argument("--text", type=Path, default=ROOT / "loadtests" / "texts" / "accuracy.txt")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "int8"])
    parser.add_argument("--max-tokens", type=int, default=50_000, help="score at most this many")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from serve_app.errors import ServeError

    text = args.text.read_text()
    results = {}
    for dtype in args.dtypes:
        started = time.perf_counter()
        try:
            loaded = load(args.model, dtype)
        except ServeError as exc:
            print(f"{dtype:>9}: cannot load: {exc.message}")
            continue
        ids = loaded.tokenizer.encode(text)[: args.max_tokens]
        ppl, scored = perplexity(loaded, ids)
        kernel = loaded.placement.kernel if loaded.placement else loaded.kernels
        results[dtype] = {"perplexity": ppl, "tokens": scored, "kernel": kernel}
        print(
            f"{dtype:>9}: perplexity {ppl:10.3f} over {scored} tokens ({kernel}, "
            f"{time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        if loaded.info.kind == "standin":
            print("           (a random-weight stand-in: its perplexity is meaningless)")
    if "float32" in results:
        base = results["float32"]["perplexity"]
        for dtype, r in results.items():
            if dtype != "float32":
                r["ratio_to_float32"] = r["perplexity"] / base
                print(f"{dtype} / float32 perplexity: {r['ratio_to_float32']:.4f}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "text": str(args.text), **results}))


if __name__ == "__main__":
    main()
