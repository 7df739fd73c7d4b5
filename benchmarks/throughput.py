"""Probes per second of each detector's forward passes, one pass at a time against batched.

For every detector, its probes advance in lockstep (as in a census): each step takes the next pass of
every probe, then runs them either one at a time (``lens.capture``, what the census did before
batching) or together (``lens.run_passes``: grouped by length, several to a forward pass). Short
probes are the built-in ones (``--preset full``: the full probe sets); long probes are the first
``--long`` of them lengthened to ``--long-tokens`` by a neutral prefix (``Detector.with_prefix``, as
``census_cost.py`` does). Only the passes are timed (generation inside them included), not
``finish()`` (its patching sweeps and statistics run once per census, whatever the batching). The
last column is the ceiling: the speed-up batching gives bare forward passes (no capture) over the
same tokens (each probe's first pass), in the same batches.

Usage: ``python benchmarks/throughput.py [--detectors sinks,circuits] [--preset full] [--limit 24]
[--long 4] [--long-tokens 2048] [--memory-budget BYTES]``. Prints one markdown table and the load
average before and after (a shared machine slows both columns).
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import torch

# Probe sets whose passes are independent forward passes; a detector that generates inside its passes
# (retrieval, preplan_anchor) still runs, but its generation is never batched.
DEFAULT_DETECTORS = "sinks,circuits,contextual,retrieval,preplan_anchor"


def _lockstep_passes(detector, probe_list, run) -> int:
    """Run every probe's passes, one step of every probe at a time; returns the forward passes run."""
    import lens

    return sum(run(step) for step in lens.lockstep(detector.passes(probe, index) for index, probe in enumerate(probe_list)))


def _one_at_a_time(model):
    import lens

    def run(step) -> int:
        for forward in step:
            lens.capture(model, forward.tokens, forward.needs, forward.interventions)
            forward.done()
        return len(step)

    return run


def _batched(model, memory_budget):
    import lens

    return lambda step: lens.run_passes(model, step, memory_budget)


def bare_speedup(model, detector, probe_list: list[dict], memory_budget) -> float:
    """How much batching speeds up bare forward passes (no capture, no edits) over the tokens of each
    probe's first pass: the ceiling of what batching can give these lengths on this machine."""
    import lens

    tokens = [next(iter(detector.passes(probe, index))).tokens for index, probe in enumerate(probe_list)]
    bare = [SimpleNamespace(tokens=t, needs=(), interventions=(), done=lambda: None) for t in tokens]

    def seconds(run) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            run()
        return time.perf_counter() - started

    alone = seconds(lambda: [lens.capture(model, t, []) for t in tokens])
    return alone / seconds(lambda: lens.run_passes(model, bare, memory_budget))


def measure(model, name: str, probe_list: list[dict], params, mode: str, memory_budget) -> dict:
    import probes

    detector = probes.get(name)(model, params)
    run = _one_at_a_time(model) if mode == "batch 1" else _batched(model, memory_budget)
    started = time.perf_counter()
    with torch.no_grad():
        forwards = _lockstep_passes(detector, probe_list, run)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "probes_per_s": len(probe_list) / seconds, "forwards": forwards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", default=DEFAULT_DETECTORS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="full", choices=["quick", "full"])
    parser.add_argument("--limit", type=int, default=24, help="short probes per detector")
    parser.add_argument("--long", type=int, default=4, help="long probes per detector (0: none)")
    parser.add_argument("--long-tokens", type=int, default=2048)
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes per batched forward (default: lens's)")
    args = parser.parse_args()

    import lens
    import probes
    from census_cost import _text_of_tokens

    model = lens.load(args.model)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name in args.detectors.split(","):
        cls = probes.get(name)
        params = cls.parse_params(cls.presets.get(args.preset, {}))
        detector = cls(model, params)
        short = [detector.check_probe(p, f"{name} probe {i + 1}") for i, p in enumerate(detector.builtin_probes()[: args.limit])]
        sets = [("short", short)]
        if args.long:
            used = max(len(detector.tokens(p[detector.prompt_field])) for p in short[: args.long]) + detector.extra_tokens()
            prefix = _text_of_tokens(model, max(1, args.long_tokens - used - 2)) + "\n\n"
            sets.append((f"~{args.long_tokens} tokens", [detector.with_prefix(p, prefix) for p in short[: args.long]]))
        measure(model, name, short[:1], params, "batch 1", args.memory_budget)  # warm-up: first-call costs
        for label, probe_list in sets:
            tokens = sum(len(detector.tokens(p[detector.prompt_field])) for p in probe_list) / len(probe_list)
            alone = measure(model, name, probe_list, params, "batch 1", args.memory_budget)
            batched = measure(model, name, probe_list, params, "batched", args.memory_budget)
            ceiling = bare_speedup(model, detector, probe_list, args.memory_budget)
            rows.append((name, label, len(probe_list), tokens, alone, batched, ceiling))
            print(f"  {name} {label}: {alone['probes_per_s']:.2f} -> {batched['probes_per_s']:.2f} probes/s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print(f"model {args.model}, preset {args.preset}, {torch.get_num_threads()} threads; passes only (finish() not timed)\n")
    print("| detector | probes | mean prompt tokens | batch 1: forwards, s, probes/s | batched: forwards, s, probes/s | speed-up | bare forwards' speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, label, n, tokens, alone, batched, ceiling in rows:
        print(f"| {name} | {n} {label} | {tokens:.0f} | {alone['forwards']}, {alone['seconds']:.1f} s, {alone['probes_per_s']:.2f} | "
              f"{batched['forwards']}, {batched['seconds']:.1f} s, {batched['probes_per_s']:.2f} | {batched['probes_per_s'] / alone['probes_per_s']:.2f}x | {ceiling:.2f}x |")


if __name__ == "__main__":
    main()
