"""One layer's blockwise attention (probabilities, output and a column-sum consumer) against SDPA,
for several rows-per-block: the numbers behind ``lens.kernels.ROWS_PER_BLOCK``.

Usage: ``python benchmarks/attention_blocks.py [--lengths 512,2048,8192] [--rows 16,32,64,128,256]``.
Shapes are SmolLM2-135M's (9 query heads, 3 KV heads, d_head 64); inputs are random, float32.
Prints milliseconds per layer and the ratio to SDPA.
"""

from __future__ import annotations

import argparse
import time

import torch

from lens.kernels import causal_block_probs


def _milliseconds(function, repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats * 1000


def blockwise(query, key, value, rows_per_block: int, scaling: float):
    n_heads, n_kv, seq_len = query.shape[1], key.shape[1], query.shape[2]
    out = torch.empty_like(query)
    received = torch.zeros(n_heads, seq_len)  # what the sinks detector sums
    for start in range(0, seq_len, rows_per_block):
        stop = min(seq_len, start + rows_per_block)
        probs = causal_block_probs(query[:, :, start:stop], key[:, :, :stop], start, scaling)
        received[:, :stop] += probs[0].sum(-2)
        out[:, :, start:stop] = torch.matmul(probs.reshape(1, n_kv, -1, stop), value[:, :, :stop]).view(1, n_heads, stop - start, -1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--rows", default="16,32,64,128,256")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    n_heads, n_kv, d_head = 9, 3, 64
    print("| tokens | SDPA ms | " + " | ".join(f"{rows} rows ms (ratio)" for rows in args.rows.split(",")) + " |")
    print("|---|---|" + "---|" * len(args.rows.split(",")))
    for seq_len in [int(n) for n in args.lengths.split(",")]:
        query = torch.randn(1, n_heads, seq_len, d_head, device=args.device)
        key = torch.randn(1, n_kv, seq_len, d_head, device=args.device)
        value = torch.randn(1, n_kv, seq_len, d_head, device=args.device)
        repeats = max(1, 2**24 // seq_len**2)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

        def sdpa():
            torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
            sync()

        reference = _milliseconds(sdpa, repeats)
        cells = []
        for rows in [int(r) for r in args.rows.split(",")]:
            ms = _milliseconds(lambda: (blockwise(query, key, value, rows, d_head**-0.5), sync()), repeats)
            cells.append(f"{ms:.1f} ({ms / reference:.2f}x)")
        print(f"| {seq_len} | {reference:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
