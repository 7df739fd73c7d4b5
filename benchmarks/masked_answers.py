"""The retrieval masking test's answers decoded one at a time against as batches (``lens.generate_each``):
the numbers behind the full preset's run time.

Usage: ``python benchmarks/masked_answers.py [--model smollm2-135m] [--length 4000] [--head-sets 21] [--tokens 20]
[--memory-budget BYTES]``.
One real prompt of ``--length`` tokens of pydoc prose; ``--head-sets`` sets of 10 random heads masked at
the query from the last prompt token on (as the test masks: the top list and 2 x 10 control draws at
one K); ``--tokens`` tokens decoded per answer (no early stop, so both ways decode the same number).
Prints seconds per answer each way and their ratio, and checks the answers agree.
"""

from __future__ import annotations

import argparse
import random
import time

import lens
from probes.retrieval import head_masks, prose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--head-sets", type=int, default=21)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes of KV cache a batch may hold (default: generate_each's)")
    args = parser.parse_args()
    model = lens.load(args.model)
    prompt = model.tokenize(lens.chat_prompt(model, prose(model.tokenizer, 0, args.length) + "\nSummarise the text above."))
    decoding = list(range(len(prompt) - 1, len(prompt) - 1 + args.tokens))
    heads = [(layer, head) for layer in range(model.info.n_layers) for head in range(model.info.n_heads)]
    rng = random.Random(0)
    conditions = [head_masks(lens.ZeroQuery, rng.sample(heads, 10), decoding) for _ in range(args.head_sets)]
    prefix = model.run_prefix(prompt[:-1])
    timings, answers = {}, {}
    for name, budget in (("one at a time", 1), ("batched", args.memory_budget)):
        options = {} if budget is None else {"memory_budget": budget}
        started = time.perf_counter()
        generations = lens.generate_each(model, prompt, conditions, max_new_tokens=args.tokens, stop_at_newline=False, prefix=prefix, **options)
        timings[name] = (time.perf_counter() - started) / len(conditions)
        answers[name] = [g.text for g in generations]
        print(f"{name:>14}: {timings[name]:.2f} s per answer ({len(prompt)} prompt tokens, {args.tokens} decoded)")
    print(f"batched / one at a time: {timings['batched'] / timings['one at a time']:.2f}x time; answers agree: {answers['batched'] == answers['one at a time']}")


if __name__ == "__main__":
    main()
