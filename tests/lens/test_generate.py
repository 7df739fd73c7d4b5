"""Generation: our greedy loop equals transformers' generate; sampling is reproducible by seed."""

import pytest
import torch

import lens


def test_greedy_equals_hf_generate(smollm2):
    prompt = smollm2.tokenize(lens.chat_prompt(smollm2, "Name a large animal that lives in the sea."))
    ours = lens.generate(smollm2, prompt, max_new_tokens=20, stop_at_newline=False)
    with torch.no_grad():
        theirs = smollm2.hf.generate(prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=lens._generate.stop_token_ids(smollm2))
    expected = [t for t in theirs[0, len(prompt):].tolist() if t not in lens._generate.stop_token_ids(smollm2)]
    assert ours.answer_tokens.tolist() == expected
    assert ours.tokens.tolist() == prompt.tolist() + expected


def test_sampling_is_seeded_and_newline_stops(smollm2):
    prompt = smollm2.tokenize("A list of fruits:\n1. apple\n2.")
    first = lens.generate(smollm2, prompt, temperature=1.0, seed=3, max_new_tokens=30)
    again = lens.generate(smollm2, prompt, temperature=1.0, seed=3, max_new_tokens=30)
    assert first.answer_tokens.tolist() == again.answer_tokens.tolist()
    greedy = lens.generate(smollm2, prompt, max_new_tokens=30)
    assert greedy.stopped_by == "newline" and greedy.text.endswith("\n") and "\n" not in greedy.text.strip()


def test_continuing_a_prefix_cache_equals_generating_from_scratch(tiny_llama):
    prompt = tiny_llama.tokenize("A list of fruits:\n1. apple\n2.")
    scratch = lens.generate(tiny_llama, prompt, max_new_tokens=12, stop_at_newline=False)
    continued = lens.generate(tiny_llama, prompt, max_new_tokens=12, stop_at_newline=False, past_key_values=tiny_llama.prefix_cache(prompt[:-3]))
    assert continued.answer_tokens.tolist() == scratch.answer_tokens.tolist() and len(scratch.answer_tokens) > 0
    with pytest.raises(ValueError, match="must hold fewer than the prompt"):
        lens.generate(tiny_llama, prompt, past_key_values=tiny_llama.prefix_cache(prompt))


def test_generate_each_equals_each_answer_decoded_alone(smollm2):
    """Batched rows under different interventions answer as each would alone, in batches of any size."""
    prompt = smollm2.tokenize(lens.chat_prompt(smollm2, "Name three large animals that live in the sea."))
    decoding = list(range(len(prompt) - 1, len(prompt) + 15))
    # Masks from the last prompt token on, so a prefix of the prompt's first tokens, run unmasked, is shared.
    conditions = [[], [lens.ZeroQuery(3, [0, 5], decoding)], [lens.ZeroQuery(0, list(range(9)), decoding)], [lens.ZeroQuery(2, [1], decoding), lens.ZeroQuery(7, [2, 4], decoding)]]
    alone = []
    for interventions in conditions:
        with lens.session(smollm2, interventions=interventions):
            alone.append(lens.generate(smollm2, prompt, max_new_tokens=16, stop_at_newline=False))
    assert len({g.text for g in alone}) >= 3, "the conditions must answer differently for the test to mean anything"
    for budget, prefix in ((1, None), (10**9, None), (10**9, smollm2.run_prefix(prompt[:-1]))):  # one row a batch, all rows in one
        each = lens.generate_each(smollm2, prompt, conditions, max_new_tokens=16, stop_at_newline=False, prefix=prefix, memory_budget=budget)
        assert [g.answer_tokens.tolist() for g in each] == [g.answer_tokens.tolist() for g in alone]
        assert [g.stopped_by for g in each] == [g.stopped_by for g in alone]
