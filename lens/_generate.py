"""The model answering a prompt: greedy by default, seeded sampling as an option.

Generation runs on the fast path (SDPA, KV cache, no capture session); detectors then analyse
prompt + answer with one teacher-forced forward pass. Inside a capture session (decode-time reading,
masked answers) every step is captured; the KV cache keeps every key (``Model.new_cache``), so each
step's query sits at its absolute position on sliding-window layers too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor


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
    stops = set(stop_token_ids(model))
    tokens = prompt_tokens.to(model.device)[None]
    answer: list[int] = []
    stopped_by = "length"
    generator = torch.Generator(device=model.device).manual_seed(seed)
    past = copy.deepcopy(prefix.cache) if prefix is not None else model.new_cache() if past_key_values is None else past_key_values
    if past.get_seq_length() >= len(prompt_tokens):
        raise ValueError(f"the KV cache holds {past.get_seq_length()} tokens; it must hold fewer than the prompt's {len(prompt_tokens)}")
    with torch.no_grad():
        step_input = tokens[:, past.get_seq_length() :]
        for _ in range(max_new_tokens):
            out = model.hf(input_ids=step_input, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if temperature > 0:
                next_id = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
            else:
                next_id = int(logits.argmax())
            if next_id in stops:
                stopped_by = "eos"
                break
            answer.append(next_id)
            if stop_at_newline and "\n" in model.tokenizer.decode([next_id]) and model.tokenizer.decode(answer).strip():
                stopped_by = "newline"
                break
            step_input = torch.tensor([[next_id]], device=model.device)
    answer_tokens = torch.tensor(answer, dtype=torch.long)
    return Generation(prompt_tokens.cpu(), answer_tokens, model.tokenizer.decode(answer), stopped_by)


def chat_prompt(model, user: str, *, system: str | None = None) -> str:
    """``user`` wrapped in the model's chat template with the assistant turn opened; plain text for
    base models without a template."""
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return user
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
