"""Evaluation on a model: batched generation, base_fit and base vs adapter on the tiny model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from lora_studio.adapters import load_adapted
from lora_studio.data import Example, encode, load_examples
from lora_studio.errors import DataError
from lora_studio.evaluation.answers import (
    answer_budget,
    base_fit,
    compare_with_base,
    generate_answers,
    split_prompt,
)
from lora_studio.models import load_tokenizer


# --- generation on the tiny model --------------------------------------------------------------
@pytest.fixture
def tiny(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, load_tokenizer(tiny_model_dir)


def _favour(model, token_id: int, strength: float = 20.0) -> None:
    """Make the model predict `token_id` after every input (a head with only a bias)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[token_id] = strength
    model.lm_head = head


def _count_forward_calls(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


PROMPTS = [
    [{"role": "user", "content": "Repeat: word1"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [{"role": "user", "content": "hello"}],
]


def test_batched_answers_match_one_at_a_time(tiny):
    model, tokenizer = tiny
    batched = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert len(batched) == len(PROMPTS)
    assert batched == single  # left padding leaves every answer as if it were alone
    assert tokenizer.padding_side == "right"  # restored after generation


def test_generation_stops_at_end_of_turn(tiny):
    model, tokenizer = tiny
    _favour(model, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    calls = _count_forward_calls(model)
    answers = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2)
    assert answers == ["", "", ""]
    assert calls[0] == 2  # one forward per batch: the first token ended every answer


def test_generation_returns_only_new_tokens_up_to_the_limit(tiny):
    model, tokenizer = tiny
    (x,) = tokenizer("x", add_special_tokens=False)["input_ids"]
    _favour(model, x)
    calls = _count_forward_calls(model)
    answers = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=3)
    assert answers == ["xxxx"] * 3
    assert calls[0] == 4


# --- task fit ----------------------------------------------------------------------------------
def _chat(answer: str, i: int) -> Example:
    return Example(
        f"row {i}",
        messages=(
            {"role": "user", "content": f"Say something {i}"},
            {"role": "assistant", "content": answer},
        ),
    )


def _noise(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!?#"
    return [_chat("".join(rng.choice(chars) for _ in range(16)), i) for i in range(n)]


def test_base_fit_of_a_random_model_is_finite_and_near_uniform(tiny):
    model, tokenizer = tiny
    fit = base_fit(model, tokenizer, _noise(10), sample=8, batch_size=3)
    assert fit.examples == 8 and fit.tokens > 8
    assert math.isfinite(fit.loss) and fit.perplexity == pytest.approx(math.exp(fit.loss))
    assert abs(fit.loss - math.log(len(tokenizer))) < 1.0  # an untrained model guesses about uniformly


def test_base_fit_scores_only_answer_tokens_and_ranks_easy_data_first(tiny):
    model, tokenizer = tiny
    (x,) = tokenizer("x", add_special_tokens=False)["input_ids"]
    _favour(model, x, strength=8.0)
    easy = [_chat("x" * (1 + i % 4), i) for i in range(12)]
    easy_fit = base_fit(model, tokenizer, easy, sample=12, batch_size=5)
    noise_fit = base_fit(model, tokenizer, _noise(12), sample=12, batch_size=5)
    assert easy_fit.loss < noise_fit.loss

    # Exactly the loss of the answer tokens (the prompt is context only): the head gives every
    # position the same distribution, so each answer token's loss is known in closed form.
    others = len(tokenizer) - 1
    hit = -math.log(math.exp(8.0) / (math.exp(8.0) + others))
    miss = -math.log(1 / (math.exp(8.0) + others))
    targets = [t for e in easy for t in encode(e, tokenizer, 512)["labels"] if t != -100]
    expected = sum(hit if t == x else miss for t in targets) / len(targets)
    assert easy_fit.tokens == len(targets)
    assert easy_fit.loss == pytest.approx(expected, rel=1e-4)
    assert easy_fit.perplexity == pytest.approx(math.exp(expected), rel=1e-4)  # perplexity = e^loss


def test_base_fit_equals_the_models_own_loss_example_by_example(tiny):
    model, tokenizer = tiny
    examples = _noise(5) + [_chat("Paris is the capital.", 9)]
    fit = base_fit(model, tokenizer, examples, sample=6, batch_size=4)  # padded batches of unequal rows
    total = count = 0
    for e in examples:
        row = encode(e, tokenizer, 512)
        n = sum(t != -100 for t in row["labels"][1:])
        with torch.no_grad():  # transformers shifts labels itself and averages over the answer tokens
            loss = model(
                input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])
            ).loss
        total, count = total + loss.item() * n, count + n
    assert fit.tokens == count
    assert fit.loss == pytest.approx(total / count, rel=1e-4)


def test_base_fit_refuses_empty_data(tiny):
    with pytest.raises(ValueError, match="at least one example"):
        base_fit(*tiny, [])


# --- base vs adapted, end to end on a trained tiny adapter -------------------------------------
def test_compare_with_base_uses_the_same_weights_with_the_adapter_off(tiny_recipe, tiny_model_dir, tmp_path):
    from lora_studio import train

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Repeat: word{i % 8}"},
                {"role": "assistant", "content": json.dumps({"w": f"word{i % 8}"})},
            ]
        }
        for i in range(40)
    ]
    data = tmp_path / "json.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(tiny_recipe.replace(train_file=str(data), max_steps=8))

    _, examples = load_examples(data)
    examples = examples[:4]
    adapted = load_adapted(result.adapter_dir)
    model, tokenizer = adapted.model, adapted.tokenizer
    comparison = compare_with_base(model, tokenizer, examples, max_new_tokens=5, batch_size=4)
    assert comparison.metric == "json"  # chosen from the references

    base, base_tokenizer = tiny_model_dir, load_tokenizer(tiny_model_dir)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prompts = [split_prompt(e)[0] for e in examples]
    base, adapter = comparison.base, comparison.adapter
    assert base.answers == generate_answers(plain, base_tokenizer, prompts, 5, 4)
    assert adapter.answers != base.answers
    assert base.score.rows == adapter.score.rows == 4
    assert adapter.fit.loss < base.fit.loss  # it learned something of this data
    assert comparison.references[0] == json.dumps({"w": "word0"})
    # The fit on the test rows is base_fit of the same model, adapter on or off.
    assert adapter.fit.loss == pytest.approx(base_fit(model, tokenizer, examples, sample=4).loss)
    with model.disable_adapter():
        assert base.fit.loss == pytest.approx(base_fit(model, tokenizer, examples, sample=4).loss)


def test_split_prompt_refuses_plain_text_rows():
    with pytest.raises(DataError, match="line 7: a plain-text row has no prompt"):
        split_prompt(Example("t.jsonl, line 7", text="just text"))


def test_answer_budget_is_the_longest_reference_plus_room(tiny):
    _, tokenizer = tiny
    refs = ["Paris", "word1 word2 word3"]
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
    assert answer_budget(tokenizer, refs) == longest + 16
    assert answer_budget(tokenizer, ["x" * 2000], cap=100) == 100
