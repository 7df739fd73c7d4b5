"""The model answering a prompt: greedy by default, seeded sampling as an option.

Generation runs on the fast path (SDPA, KV cache, no capture session); detectors then analyse
prompt + answer with one teacher-forced forward pass. Inside a capture session (decode-time reading,
masked answers) every step is captured; the KV cache keeps every key (``Model.new_cache``), so each
step's query sits at its absolute position on sliding-window layers too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from lens._capture.batch import ItemEdit
from lens._capture.interventions import Intervention
from lens._capture.session import BatchItem, session

# An ItemEdit sees the positions below its item's length; a decoded row's positions are all its own.
_EVERY_POSITION = sys.maxsize
# KV-cache bytes a batch of decoded rows may hold (default): 11 rows of 4,000 SmolLM2 tokens, where a
# batch decodes in 0.64x the time of its rows one at a time (``benchmarks/masked_answers.py``).
DEFAULT_DECODE_BUDGET = 2**31


@dataclass(frozen=True)
class Generation:
    prompt_tokens: Int[Tensor, " prompt"]
    # Every generated token, including a final newline that stopped it; not an EOS / end-of-turn token.
    answer_tokens: Int[Tensor, " answer"]
    text: str
    stopped_by: str  # "eos", "newline" or "length"

    @property
    def tokens(self) -> Int[Tensor, " total"]:
        """Prompt followed by answer: what the teacher-forced pass reads."""
        return torch.cat([self.prompt_tokens, self.answer_tokens])

    @property
    def answer_positions(self) -> range:
        start = len(self.prompt_tokens)
        return range(start, start + len(self.answer_tokens))


def stop_token_ids(model) -> list[int]:
    """EOS and end-of-turn ids of the model's tokenizer."""
    tokenizer = model.tokenizer
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<eos>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def generate(
    model,
    prompt_tokens: Int[Tensor, " prompt"],
    *,
    max_new_tokens: int = 50,
    stop_at_newline: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    past_key_values=None,
    prefix=None,
) -> Generation:
    """Decode an answer. With ``stop_at_newline`` it ends at the first newline once the answer has
    begun (some non-space text before it). ``temperature > 0`` samples, seeded by ``seed``.
    ``past_key_values``: a KV cache already holding the first tokens of the prompt, from
    ``model.prefix_cache`` (it is extended in place, so pass a copy to reuse it); only the rest of the
    prompt is fed. ``prefix``: the prompt's first tokens run once (``model.run_prefix``), copied here, so
    one prefix serves many generations."""
    model.check_length(len(prompt_tokens) + max_new_tokens, what="prompt plus answer")
    generator = torch.Generator(device=model.device).manual_seed(seed)

    def sample(logits: Tensor) -> list[int]:
        return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0].tolist()

    past = prefix.copy() if prefix is not None else model.new_cache() if past_key_values is None else past_key_values
    return _decode(model, prompt_tokens, past, 1, sample if temperature > 0 else _greedy, max_new_tokens, stop_at_newline)[0]


def generate_each(
    model,
    prompt_tokens: Int[Tensor, " prompt"],
    interventions: Sequence[Sequence[Intervention]],
    *,
    max_new_tokens: int = 50,
    stop_at_newline: bool = True,
    prefix=None,
    memory_budget: int = DEFAULT_DECODE_BUDGET,
) -> list[Generation]:
    """The greedy answer to one prompt under each set of ``interventions``, decoded as batches: batch
    row i runs under ``interventions[i]`` alone, as ``generate`` inside a session with those
    interventions would (the retrieval masking test: one prompt, many masked head sets). Rows share
    each step's weights, so a batch costs little more than one answer on a CPU. A batch holds as many
    rows as fit their KV caches (prompt plus answer) in ``memory_budget`` bytes."""
    model.check_length(len(prompt_tokens) + max_new_tokens, what="prompt plus answer")
    info = model.info
    row_bytes = (len(prompt_tokens) + max_new_tokens) * info.n_layers * 2 * info.n_kv_heads * info.d_head * getattr(torch, info.dtype).itemsize
    per_batch = max(1, memory_budget // row_bytes)
    answers: list[Generation] = []
    for start in range(0, len(interventions), per_batch):
        rows = interventions[start : start + per_batch]
        edits = [ItemEdit(edit, BatchItem(row, length=_EVERY_POSITION)) for row, row_edits in enumerate(rows) for edit in row_edits]
        past = prefix.copy(len(rows)) if prefix is not None else model.new_cache()
        with session(model, interventions=edits):
            answers += _decode(model, prompt_tokens, past, len(rows), _greedy, max_new_tokens, stop_at_newline)
    return answers


def _greedy(logits: Tensor) -> list[int]:
    return logits.argmax(-1).tolist()


def _decode(model, prompt_tokens: Tensor, past, n_rows: int, choose, max_new_tokens: int, stop_at_newline: bool) -> list[Generation]:
    """``n_rows`` answers continuing ``prompt_tokens`` from the KV cache ``past`` (holding its first
    tokens, repeated over the rows), each step's next tokens picked by ``choose(logits [row, vocab])``.
    A row that has stopped keeps a place in the batch until every row has; its later tokens are dropped."""
    if past.get_seq_length() >= len(prompt_tokens):
        raise ValueError(f"the KV cache holds {past.get_seq_length()} tokens; it must hold fewer than the prompt's {len(prompt_tokens)}")
    stops = set(stop_token_ids(model))
    answers: list[list[int]] = [[] for _ in range(n_rows)]
    stopped_by = ["length"] * n_rows
    live = set(range(n_rows))
    step_input = prompt_tokens.to(model.device)[None, past.get_seq_length() :].expand(n_rows, -1)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model.hf(input_ids=step_input, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            next_ids = choose(out.logits[:, -1].float())
            for row in sorted(live):
                answer, next_id = answers[row], next_ids[row]
                if next_id in stops:
                    stopped_by[row] = "eos"
                    live.discard(row)
                    continue
                answer.append(next_id)
                if stop_at_newline and "\n" in model.tokenizer.decode([next_id]) and model.tokenizer.decode(answer).strip():
                    stopped_by[row] = "newline"
                    live.discard(row)
            if not live:
                break
            step_input = torch.tensor(next_ids, device=model.device)[:, None]
    return [
        Generation(prompt_tokens.cpu(), torch.tensor(answer, dtype=torch.long), model.tokenizer.decode(answer), stop)
        for answer, stop in zip(answers, stopped_by)
    ]


def chat_prompt(model, user: str, *, system: str | None = None) -> str:
    """``user`` wrapped in the model's chat template with the assistant turn opened; plain text for
    base models without a template."""
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return user
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
