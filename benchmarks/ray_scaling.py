"""Wall time of one census on a local Ray with 1 and with 2 workers (and in-process), and the speed-up.

    python benchmarks/ray_scaling.py [--model smollm2-135m] [--detectors sinks] [--limit 16] [--shard-size 2]

Each run uses a fresh store and a fresh Ray (start-up included: that is what a user waits for). On a
machine with N cores, 2 workers of one thread each compete with nothing else only when N >= 2.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import lens


def timed(model, args, **executor) -> float:
    import ray

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        lens.census(model, args.detectors.split(","), store, limit=args.limit, shard_size=args.shard_size, **executor)
    if ray.is_initialized():
        ray.shutdown()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--detectors", default="sinks")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=2)
    args = parser.parse_args()
    model = lens.load(args.model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like one Ray worker, so the in-process row is one replica's speed
    local = timed(model, args)
    torch.set_num_threads(threads)
    one = timed(model, args, executor="ray", workers=1)
    two = timed(model, args, executor="ray", workers=2)
    print(f"{args.detectors} x {args.limit} probes on {args.model}, shards of {args.shard_size}")
    print("| executor | wall time | speed-up over 1 Ray worker |\n|---|---|---|")
    print(f"| in-process, 1 thread | {local:.1f} s | - |")
    print(f"| Ray, 1 worker | {one:.1f} s | 1.00 |")
    print(f"| Ray, 2 workers | {two:.1f} s | {one / two:.2f} |")


if __name__ == "__main__":
    main()
