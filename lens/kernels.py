"""The attention kernels capture computes rows with, public for benchmarks and reference checks.

``causal_block_probs`` is one block of consecutive query rows under a purely causal mask (only the
block's diagonal square is masked); ``attention_probs`` is any rows under a key mask;
``ROWS_PER_BLOCK`` is the block height on the CPU (``benchmarks/attention_blocks.py`` measures it).
"""

from lens._capture.attention import ROWS_PER_BLOCK, attention_probs, causal_block_probs

__all__ = ["ROWS_PER_BLOCK", "attention_probs", "causal_block_probs"]
