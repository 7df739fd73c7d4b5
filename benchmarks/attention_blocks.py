"""One layer's blockwise attention (probabilities, output and a column-sum consumer) against SDPA,
for several rows-per-block: the numbers behind ``lens.kernels.ROWS_PER_BLOCK``.

Usage: ``python benchmarks/attention_blocks.py [--lengths 512,2048,8192] [--rows 16,32,64,128,256] [--fused]``.
Shapes are SmolLM2-135M's (9 query heads, 3 KV heads, d_head 64); inputs are random, float32.
Prints milliseconds per layer and the ratio to SDPA. ``--fused`` adds two ways to get the column sums
around SDPA's fused CPU kernel (which returns each row's log-sum-exp): ``exp(scores - lse)`` summed
over rows block by block, and a second, transposed flash call whose log-sum-exp is the column sum.
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


def _flash(query, key, value, causal: bool, scaling: float):
    """(output, log-sum-exp per row) of PyTorch's fused CPU attention kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, scale=scaling)


def lse_blocks(query, key, value, rows_per_block: int, scaling: float):
    """SDPA with its log-sum-exp, then the column sums from ``exp(scores - lse)`` block by block."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    out, lse = _flash(query, key, value, True, scaling)
    seq_len = query.shape[2]
    received = torch.zeros(query.shape[1], seq_len)
    for start in range(0, seq_len, rows_per_block):
        stop = min(seq_len, start + rows_per_block)
        scores = torch.matmul(query[:, :, start:stop] * scaling, key[:, :, :stop].transpose(-1, -2)).sub_(lse[:, :, start:stop, None])
        scores[..., start:stop].masked_fill_(torch.ones(stop - start, stop - start, dtype=torch.bool).triu_(1), float("-inf"))
        received[:, :stop] += scores.exp_()[0].sum(-2)
    return out, received


def transposed_flash(query, key, value, scaling: float):
    """SDPA with its log-sum-exp, then a flash call with keys as queries and queries (their row's
    log-sum-exp folded in as one more dimension) as keys, positions reversed so it stays causal: its
    log-sum-exp is log(attention each key receives)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    out, lse = _flash(query, key, value, True, scaling)
    keys_as_queries = torch.cat([key * scaling, torch.ones_like(key[..., :1])], -1).flip(2)
    queries_as_keys = torch.cat([query, -lse[..., None]], -1).flip(2)
    _, received_log = _flash(keys_as_queries, queries_as_keys, queries_as_keys, True, 1.0)
    return out, received_log.flip(2).exp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--rows", default="16,32,64,128,256")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fused", action="store_true", help="add the two fused column-sum alternatives (CPU only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n_heads, n_kv, d_head = 9, 3, 64
    fused = ["SDPA + exp(scores - lse), 64 rows", "SDPA + transposed flash"] if args.fused else []
    print("| tokens | SDPA ms | " + " | ".join([f"{rows} rows ms (ratio)" for rows in args.rows.split(",")] + fused) + " |")
    print("|---|---|" + "---|" * (len(args.rows.split(",")) + len(fused)))
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
        if args.fused:
            for alternative in (lambda: lse_blocks(query, key, value, 64, d_head**-0.5), lambda: transposed_flash(query, key, value, d_head**-0.5)):
                ms = _milliseconds(alternative, repeats)
                cells.append(f"{ms:.1f} ({ms / reference:.2f}x)")
        print(f"| {seq_len} | {reference:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
