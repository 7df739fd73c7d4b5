"""A long needle-in-a-haystack probe on the CPU: time and peak memory of the retrieval detector.

One built-in probe of ``--length`` haystack tokens (default 4000) with the needle at ``--depth``, run
through ``lens.census`` (scores only: ``ablation_trials=0``) with both scoring paths:

- ``teacher_forced``: generate on the fast path, then one forward over prompt + answer computing
  attention only for the answer's rows (the default);
- ``decode``: read each decoding step's attention row while generating.

Each path runs in its own process, so peak RSS is its own. A full attention cache of the same pass
(every layer, every head, T x T, float32) is printed for comparison.

Usage: ``python benchmarks/retrieval_long.py [--length 4000] [--depth 0.5] [--model smollm2-135m]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def child(model_name: str, length: int, depth: float, scoring: str) -> dict:
    import torch

    import lens
    from probes.retrieval import Retrieval, RetrievalParams

    torch.set_grad_enabled(False)
    model = lens.load(model_name)
    probe = Retrieval(model, RetrievalParams(lengths=[length], depths=[depth])).builtin_probes()[0]
    baseline_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/probe.jsonl"
        with open(path, "w") as handle:
            handle.write(json.dumps({"prompt": probe["prompt"], "needle": probe["needle"]}) + "\n")
        started = time.perf_counter()
        result = lens.census(model, ["retrieval"], f"{folder}/store", probes_file=path,
                             params={"retrieval": {"ablation_trials": "0", "scoring": scoring}})
        seconds = time.perf_counter() - started
        trial = result.reports["retrieval"][1].frame.iloc[0]
    info = model.info
    n = int(trial["prompt_tokens"]) + len(model.tokenize(trial["answer"]))
    return {
        "scoring": scoring,
        "prompt_tokens": int(trial["prompt_tokens"]),
        "answer": trial["answer"],
        "recall": float(trial["recall"]),
        "top_head": trial["top_head"],
        "seconds": seconds,
        "model_gb": baseline_gb,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "full_cache_gb": info.n_layers * info.n_heads * n * n * 4 / 1024**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.length, args.depth, args.child)))
        return
    rows = []
    for scoring in ("teacher_forced", "decode"):
        command = [sys.executable, __file__, "--length", str(args.length), "--depth", str(args.depth), "--model", args.model, "--child", scoring]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    print(f"{args.model}, haystack {args.length} tokens, needle depth {args.depth}")
    print(f"{'scoring':<15}{'prompt':>8}{'seconds':>9}{'model GB':>10}{'peak GB':>9}{'full T^2 cache GB':>19}  recall  top head  answer")
    for row in rows:
        print(f"{row['scoring']:<15}{row['prompt_tokens']:>8}{row['seconds']:>9.1f}{row['model_gb']:>10.2f}{row['peak_gb']:>9.2f}"
              f"{row['full_cache_gb']:>19.1f}  {row['recall']:.2f}    {row['top_head']:<8}  {row['answer']!r}")


if __name__ == "__main__":
    main()
