"""Time and peak memory of a census against a bare SDPA forward pass, as ratios.

Each measurement runs in its own process (peak RSS is per process), on prompts of exactly N tokens:

- ``bare``: transformers with SDPA attention, one forward pass (``use_cache=False``), all logits;
- ``tl``: TransformerLens ``run_with_cache`` of everything, then straightforward detector code on the
  cached patterns (what a user would write today); skipped where its cache cannot fit in memory;
- ``census``: ``lens.census`` with the detector(s) on a one-probe file of N tokens.

Usage: ``python benchmarks/census_cost.py [--lengths 512,2048,8192] [--detectors sinks] [--model smollm2-135m]``
Prints a table of seconds, peak RSS and ratios against ``bare`` at the same length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Bytes per token^2 of a TransformerLens full cache on SmolLM2 (patterns and scores of 30 layers x 9 heads,
# float32), used to skip runs that cannot fit: 2 tensors x 270 heads x 4 bytes.
_TL_BYTES_PER_TOKEN2 = 2 * 270 * 4


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmHWM in /proc/self/status")


def _text_of_tokens(model, n_tokens: int) -> str:
    """A text that tokenizes to exactly ``n_tokens`` (built-in sinks probes, repeated)."""
    from probes._base import builtin_probe_file

    corpus = "\n\n".join(p["text"] for p in builtin_probe_file("sinks.jsonl"))
    ids: list[int] = []
    while len(ids) < n_tokens + 8:
        ids += model.tokenize(corpus).tolist()
    text = model.tokenizer.decode(ids[:n_tokens])
    while len(model.tokenize(text)) > n_tokens:  # decoding can merge tokens; trim until it fits
        text = text[:-1]
    return text


def child(mode: str, detectors: str, n_tokens: int, model_name: str, device: str, params: dict) -> dict:
    import torch

    import lens

    torch.set_grad_enabled(False)
    model = lens.load(model_name, device=device)
    tokens = model.tokenize(_text_of_tokens(model, n_tokens))
    baseline_gb = _peak_rss_gb()
    started = time.perf_counter()
    if mode == "bare":
        model.hf.config._attn_implementation = "sdpa"
        model.hf(input_ids=tokens[None].to(device), use_cache=False)
    elif mode == "tl":
        _, cache = model.bridge.run_with_cache(tokens[None].to(device))
        # Straightforward detector code on the full cache: first-token importance of every head.
        scores = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, :, :, 0].mean(-1) for layer in range(model.info.n_layers)])
        assert scores.shape == (model.info.n_layers, model.info.n_heads)
    elif mode == "census":
        with tempfile.TemporaryDirectory() as tmp:
            probe_file = os.path.join(tmp, "probe.jsonl")
            with open(probe_file, "w") as handle:
                handle.write(json.dumps({"text": model.tokenizer.decode(tokens)}) + "\n")
            chosen = detectors.split(",")
            lens.census(model, chosen, os.path.join(tmp, "store"), probes_file=probe_file,
                        params={name: values for name, values in params.items() if name in chosen})
    else:
        raise ValueError(mode)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "peak_rss_gb": _peak_rss_gb(), "load_rss_gb": baseline_gb}
    if device.startswith("cuda"):
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return result


def _measure(mode: str, detectors: str, n_tokens: int, model: str, device: str, params: list[str]) -> dict | None:
    command = [sys.executable, __file__, "--child", mode, "--detectors", detectors, "--lengths", str(n_tokens), "--model", model, "--device", device]
    command += [arg for param in params for arg in ("--param", param)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {mode} {detectors} {n_tokens}: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--detectors", default="sinks", help="comma-separated; each alone, then all together when several")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-gb", type=float, default=20.0, help="skip tl runs whose cache would exceed this")
    parser.add_argument("--param", action="append", default=[], metavar="DETECTOR.NAME=VALUE", help="detector parameter for the census runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from lens._cli import _parse_param_flags

        print(json.dumps(child(args.child, args.detectors, int(args.lengths), args.model, args.device, _parse_param_flags(args.param))))
        return

    detector_sets = args.detectors.split(",") + ([args.detectors] if "," in args.detectors else [])
    rows = []
    for n_tokens in [int(n) for n in args.lengths.split(",")]:
        bare = _measure("bare", "", n_tokens, args.model, args.device, [])
        rows.append(("bare", "-", n_tokens, bare, bare))
        tl_gb = _TL_BYTES_PER_TOKEN2 * n_tokens**2 / 1024**3
        if tl_gb < args.memory_gb:
            rows.append(("tl full cache", "sinks", n_tokens, _measure("tl", "sinks", n_tokens, args.model, args.device, []), bare))
        else:
            rows.append(("tl full cache", f"skipped: needs ~{tl_gb:.0f} GB", n_tokens, None, bare))
        for detectors in detector_sets:
            rows.append(("lens census", detectors, n_tokens, _measure("census", detectors, n_tokens, args.model, args.device, args.param), bare))

    print(f"\nmodel {args.model}, device {args.device}, census params {args.param or 'defaults'}; ratios are against the bare SDPA forward at the same length\n")
    print(f"| run | detectors | tokens | seconds | peak RSS GB | time ratio | memory ratio |")
    print(f"|---|---|---|---|---|---|---|")
    for mode, detectors, n_tokens, result, bare in rows:
        if result is None:
            print(f"| {mode} | {detectors} | {n_tokens} | - | - | - | - |")
            continue
        time_ratio = result["seconds"] / bare["seconds"] if bare else float("nan")
        memory_ratio = result["peak_rss_gb"] / bare["peak_rss_gb"] if bare else float("nan")
        print(f"| {mode} | {detectors} | {n_tokens} | {result['seconds']:.2f} | {result['peak_rss_gb']:.2f} | {time_ratio:.2f} | {memory_ratio:.2f} |")


if __name__ == "__main__":
    main()
