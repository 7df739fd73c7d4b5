"""Time and peak memory of a census against bare SDPA forward passes over the same tokens, as ratios.

For every length and every detector (each alone, then all of them in one census), three runs, each
in its own process (peak RSS is per process):

- ``lens census``: ``lens.census`` on one probe of N tokens per detector: the detector's first
  built-in probe, lengthened to N tokens (answer tokens included) by a neutral text before its
  context (``Detector.with_prefix``). Every decoder call it makes is recorded (batch, new tokens,
  cached tokens, gradients, LM-head rows);
- ``bare``: the same decoder calls replayed with plain transformers SDPA attention and no capture:
  the same forward passes, generation steps, KV-cache reuse and backward passes, over random tokens.
  This is the baseline of the ratios, so a detector that generates or ablates is charged only for
  what capture adds, not for the experiment it runs;
- ``tl full cache``: TransformerLens ``run_with_cache`` of everything over the N-token probe, then
  straightforward code for one headline head statistic per detector on the cached patterns and head outputs. It is one
  forward pass with no generation, so it is a lower bound on a TransformerLens script; skipped where
  its cache cannot fit (``--memory-gb``).

Usage: ``python benchmarks/census_cost.py [--lengths 512,2048,8192] [--detectors sinks,retrieval]
[--param sinks.calibrate=false] [--without AttentionRows] [--device cuda] [--context 32768] [--repeats 5]``.
``--without`` drops needs of those kinds from every pass (the bare replay follows the passes that
remain): what a statistic costs, e.g. the sinks pass without its every-row attention sums.
Prints one markdown table with seconds, peak memory (RSS; on CUDA also device memory) and ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

# float32 bytes per token^2 of a TransformerLens full cache of SmolLM2 (hook_attn_scores and
# hook_pattern of 30 layers x 9 heads), used to skip runs that cannot fit.
_TL_BYTES_PER_TOKEN2 = 2 * 270 * 4


def _median_run(runs: list[dict | None]) -> dict | None:
    """The run of median time (the lower middle one of an even count); None if any run failed."""
    if not runs or any(run is None for run in runs):
        return None
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _text_of_tokens(model, n_tokens: int) -> str:
    """A neutral text of about ``n_tokens`` tokens (the built-in sinks probes, repeated)."""
    from probes import builtin_probe_file

    corpus = "\n\n".join(p["text"] for p in builtin_probe_file("sinks.jsonl"))
    ids: list[int] = []
    while len(ids) < n_tokens + 8:
        ids += model.tokenize(corpus).tolist()
    text = model.tokenizer.decode(ids[:n_tokens])
    while len(model.tokenize(text)) > n_tokens:  # decoding can merge tokens; trim until it fits
        text = text[:-1]
    return text


def probe_of_length(detector, n_tokens: int) -> dict:
    """The detector's first built-in probe, lengthened to about ``n_tokens`` including its answer."""
    probe = detector.builtin_probes()[0]
    used = len(detector.tokens(probe[detector.prompt_field])) + detector.extra_tokens()
    if used >= n_tokens:
        return probe
    return detector.with_prefix(probe, _text_of_tokens(detector.model, n_tokens - used - 2) + "\n\n")


class DecoderTrace:
    """Records every call of the model's decoder and LM head while active."""

    def __init__(self, model):
        self.calls: list[dict] = []
        decoder, head = model.hf.get_decoder(), model.hf.get_output_embeddings()
        self._handles = [
            decoder.register_forward_pre_hook(self._decoder_call, with_kwargs=True),
            head.register_forward_hook(self._head_call),
        ]

    def _decoder_call(self, _module, args, kwargs):
        import torch

        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if inputs is None:
            inputs = args[0]
        past = kwargs.get("past_key_values")
        self.calls.append(
            {
                "batch": int(inputs.shape[0]),
                "new": int(inputs.shape[1]),
                "past": int(past.get_seq_length()) if past is not None else 0,
                "use_cache": bool(kwargs.get("use_cache", past is not None)),
                "grad": torch.is_grad_enabled(),
                "head_rows": 0,
            }
        )

    def _head_call(self, _module, inputs, _output):
        if self.calls:
            self.calls[-1]["head_rows"] += int(inputs[0].shape[-2])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def replay(model, calls: list[dict]) -> None:
    """The traced decoder calls with plain SDPA attention over random tokens, no capture."""
    import torch

    model.hf.config._attn_implementation = "sdpa"
    decoder, head, embedding = model.hf.get_decoder(), model.hf.get_output_embeddings(), model.hf.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    cache = None
    for call in calls:
        ids = torch.randint(0, model.tokenizer.vocab_size, (call["batch"], call["new"]), generator=generator).to(model.device)
        past = None
        if call["past"]:
            if cache is None or cache.get_seq_length() < call["past"]:
                prefix = torch.randint(0, model.tokenizer.vocab_size, (1, call["past"]), generator=generator).to(model.device)
                cache = model.prefix_cache(prefix)  # every key kept, as the census's prefix caches (crop works)
            if cache.get_seq_length() > call["past"]:
                cache.crop(call["past"] - cache.get_seq_length())  # a negative count drops that many tokens
            if cache.layers[0].keys.shape[0] != call["batch"]:
                cache.batch_select_indices(torch.zeros(call["batch"], dtype=torch.long, device=model.device))
            past = cache
        elif call["use_cache"]:
            past = model.new_cache()  # as lens.generate
        with torch.set_grad_enabled(call["grad"]):
            embeds = embedding(ids)
            if call["grad"]:
                embeds = embeds.detach().requires_grad_()
            out = decoder(inputs_embeds=embeds, past_key_values=past, use_cache=call["use_cache"])
            rows = min(call["head_rows"], call["new"])
            logits = head(out.last_hidden_state[:, -rows:]) if rows else out.last_hidden_state[:, -1:]
            if call["grad"]:
                logits.float().sum().backward()
        cache = out.past_key_values if call["use_cache"] else cache
        del out, logits, embeds  # free this call's graph before the next call


def tl_statistics(model, cache, n_tokens: int):
    """Straightforward code on a TransformerLens full cache, as a detector's headline head statistic
    reads it: every head's mean attention distance (each cached pattern in full) and its output norm at
    the last position (hook_z). Any detector's own statistic is a reduction of the same size."""
    import torch

    distance = (torch.arange(n_tokens)[:, None] - torch.arange(n_tokens)[None, :]).clamp_min(0).float()
    layers = range(model.info.n_layers)
    mean_distance = torch.stack([(cache[f"blocks.{layer}.attn.hook_pattern"][0] * distance).sum(-1).mean(-1) for layer in layers])
    output_norm = torch.stack([cache[f"blocks.{layer}.attn.hook_z"][0, -1].norm(dim=-1) for layer in layers])
    return mean_distance, output_norm


def _drop_needs(detectors: list[str], kinds: list[str]) -> None:
    """Make the detectors' passes ask for none of ``kinds`` (need class names, e.g. ``AttentionRows``):
    what a census costs without those statistics (the reports built from them are then meaningless)."""
    import probes

    for name in detectors:
        cls = probes.get(name)

        def passes(self, probe, index, original=cls.passes):
            for forward in original(self, probe, index):
                forward.needs = [need for need in forward.needs if type(need).__name__ not in kinds]
                yield forward

        cls.passes = passes


def child(mode: str, detectors: list[str], n_tokens: int, args) -> dict:
    import torch

    import lens
    import probes

    model = lens.load(args.model, device=args.device)
    if args.context and args.context > model.info.n_ctx:
        # Cost measurement only: outputs past the trained context are not meaningful.
        model.info = dataclasses.replace(model.info, n_ctx=args.context)
    params = probes.parse_param_flags(args.param)
    if args.without:
        _drop_needs(detectors, args.without.split(","))
    instances = {name: probes.get(name)(model, probes.get(name).parse_params(params.get(name, {}))) for name in detectors}
    probe_sets = {name: [probe_of_length(detector, n_tokens)] for name, detector in instances.items()}
    calls: list[dict] = []
    if mode == "bare":
        with open(args.trace) as handle:
            calls = json.load(handle)
    if mode == "tl":
        # A TransformerLens user holds the bridge alone: drop the transformers copy before measuring.
        bridge, model.hf = model.bridge, None
        gc.collect()
    load_gb = _peak_rss_gb()
    _reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if mode == "bare":
        replay(model, calls)
    elif mode == "tl":
        text = probe_sets[detectors[0]][0][instances[detectors[0]].prompt_field]
        tokens = model.tokenize(text)[:n_tokens]
        with torch.no_grad():
            _, cache = bridge.run_with_cache(tokens[None].to(args.device))
            for _ in detectors:  # one statistic per detector, as a script computing each would
                tl_statistics(model, cache, len(tokens))
    elif mode == "census":
        trace = DecoderTrace(model)
        with tempfile.TemporaryDirectory() as tmp:
            lens.census(model, detectors, os.path.join(tmp, "store"), probes=probe_sets, params={n: v for n, v in params.items() if n in detectors})
        trace.remove()
        with open(args.trace, "w") as handle:
            json.dump(trace.calls, handle)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    result = {"seconds": time.perf_counter() - started, "peak_rss_gb": _peak_rss_gb(), "rss_before_gb": load_gb}
    if args.device.startswith("cuda"):
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    if mode == "census":
        result["decoder_calls"] = len(trace.calls)
        result["tokens_processed"] = sum(c["batch"] * c["new"] for c in trace.calls)
    return result


def _measure(mode: str, detectors: str, n_tokens: int, args, trace: str) -> dict | None:
    command = [sys.executable, __file__, "--child", mode, "--detectors", detectors, "--lengths", str(n_tokens), "--model", args.model,
               "--device", args.device, "--trace", trace, "--context", str(args.context or 0), "--without", args.without]
    command += [arg for param in args.param for arg in ("--param", param)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        print(f"  {mode} {detectors} {n_tokens}: failed: {lines[-1] if lines else proc.returncode}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--detectors", default=None, help="comma-separated; each alone, then all together (default: every registered detector)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--context", type=int, default=0, help="allow lengths past the model's context (cost only)")
    parser.add_argument("--memory-gb", type=float, default=20.0, help="skip tl runs whose cache would exceed this")
    parser.add_argument("--no-tl", action="store_true", help="skip the TransformerLens runs")
    parser.add_argument("--param", action="append", default=[], metavar="DETECTOR.NAME=VALUE", help="detector parameter for the census runs")
    parser.add_argument("--without", default="", metavar="NEED,...",
                        help="census passes without these needs (AttentionRows, Residual, Logits, LogitChunks): what those statistics cost")
    parser.add_argument("--repeats", type=int, default=1, help="runs of census and bare each (alternating); the median run of each is kept")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trace", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.detectors is None:
        import probes

        args.detectors = ",".join(probes.available())
    if args.child:
        print(json.dumps(child(args.child, args.detectors.split(","), int(args.lengths), args)))
        return

    names = args.detectors.split(",")
    detector_sets = names + ([args.detectors] if len(names) > 1 else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_tokens in [int(n) for n in args.lengths.split(",")]:
            for detectors in detector_sets:
                trace = os.path.join(tmp, f"trace-{n_tokens}-{len(rows)}.json")
                # Census and bare runs alternate, so a change in the machine's speed hits both alike;
                # each column keeps its median run.
                censuses, bares = [], []
                for _ in range(args.repeats):
                    censuses.append(_measure("census", detectors, n_tokens, args, trace))
                    bares.append(_measure("bare", detectors, n_tokens, args, trace) if censuses[-1] else None)
                census, bare = _median_run(censuses), _median_run(bares)
                tl_gb = _TL_BYTES_PER_TOKEN2 * n_tokens**2 / 1024**3
                if args.no_tl:
                    tl, tl_note = None, "not run"
                elif tl_gb < args.memory_gb:
                    tl, tl_note = _measure("tl", detectors, n_tokens, args, trace), ""
                else:
                    tl, tl_note = None, f"cannot run: its cache needs ~{tl_gb:.0f} GB"
                rows.append((detectors, n_tokens, bare, census, tl, tl_note))
                print(f"  measured {json.dumps([detectors, n_tokens, bare, census, tl, tl_note])}", file=sys.stderr, flush=True)

    cuda = args.device.startswith("cuda")
    memory = "peak_cuda_gb" if cuda else "peak_rss_gb"
    without = f", census passes without {args.without}" if args.without else ""
    print(f"\nmodel {args.model}, device {args.device}, census params {args.param or 'defaults'}{without}; "
          f"memory is {'peak CUDA allocation' if cuda else 'peak RSS'}; ratios are against the bare replay\n")
    print("| detectors | tokens | decoder calls | bare s | bare GB | census s | census GB | time ratio | memory ratio | TL full cache s | TL GB | TL time ratio | TL memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for detectors, n_tokens, bare, census, tl, tl_note in rows:
        cells = [detectors, str(n_tokens)]
        if census and bare:
            cells += [str(census["decoder_calls"]), f"{bare['seconds']:.2f}", f"{bare[memory]:.2f}", f"{census['seconds']:.2f}", f"{census[memory]:.2f}",
                      f"{census['seconds'] / bare['seconds']:.2f}", f"{census[memory] / bare[memory]:.2f}"]
        else:
            cells += ["failed"] + ["-"] * 6
        if tl and bare:
            cells += [f"{tl['seconds']:.2f}", f"{tl[memory]:.2f}", f"{tl['seconds'] / bare['seconds']:.2f}", f"{tl[memory] / bare[memory]:.2f}"]
        else:
            cells += [tl_note or "failed", "-", "-", "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
