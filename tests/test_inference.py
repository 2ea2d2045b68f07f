"""The inference engine on the tiny model: adapters by name, switching, stops, concurrency, refusals."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from adapter_helpers import build_constant_model, edit_json

from lora_studio.adapters import adapter_name
from lora_studio.errors import ModelError, RequestError
from lora_studio.generation import GenerationSettings, stop_token_ids
from lora_studio.inference import InferenceEngine

PROMPT = [{"role": "user", "content": "Repeat: word3"}]
N = 12  # tokens per answer: enough to tell the random adapters apart


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapters) -> InferenceEngine:
    engine = InferenceEngine(str(tiny_model_dir))
    for name, path in tiny_adapters.items():
        engine.load_adapter(name, path)
    return engine


def test_switching_gives_each_adapter_its_own_output_and_leaves_the_base_unchanged(
    tiny_model_dir, tiny_adapters
):
    engine = InferenceEngine(str(tiny_model_dir))
    ids = engine.encode_chat(PROMPT)
    base_logits, base_answer = engine.logits(ids), engine.chat(PROMPT, max_new_tokens=N)
    for name, path in tiny_adapters.items():
        engine.load_adapter(name, path)
    assert engine.adapter_names() == ["alpha", "beta"]

    answers = {name: engine.chat(PROMPT, name, max_new_tokens=N) for name in ["alpha", "beta", "alpha"]}
    assert len({answers["alpha"], answers["beta"], base_answer}) == 3
    assert engine.chat(PROMPT, "alpha", max_new_tokens=N) == answers["alpha"]  # switching back is exact
    assert engine.chat(PROMPT, max_new_tokens=N) == base_answer
    assert torch.equal(engine.logits(ids), base_logits)  # loading adapters did not touch the base


def test_each_adapter_computes_exactly_what_peft_computes_for_it_alone(engine, tiny_model_dir, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = engine.encode_chat(PROMPT)
    for name in ["beta", "alpha"]:  # the engine's last-loaded adapter first, then a switch
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        alone = PeftModel.from_pretrained(base, str(tiny_adapters[name])).eval()
        with torch.no_grad():
            expected = alone(input_ids=ids).logits
        torch.testing.assert_close(engine.logits(ids, name), expected, rtol=0, atol=1e-6)


def test_concurrent_requests_for_different_adapters_never_mix(engine):
    expected = {name: engine.chat(PROMPT, name, max_new_tokens=N) for name in ["alpha", "beta", None]}
    requests = ["alpha", "beta", None] * 3
    results: list[str | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def ask(i: int, adapter: str | None) -> None:
        barrier.wait()  # all start at once
        if i % 2:  # half streamed, half whole
            results[i] = "".join(engine.stream_chat(PROMPT, adapter, max_new_tokens=N))
        else:
            results[i] = engine.chat(PROMPT, adapter, max_new_tokens=N)

    threads = [threading.Thread(target=ask, args=(i, a)) for i, a in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected[a] for a in requests]


def test_streamed_pieces_make_the_whole_answer_and_report_totals(engine):
    reply = engine.start(PROMPT, "beta", max_new_tokens=N)
    pieces = list(reply)
    assert len(pieces) > 1 and "".join(pieces) == reply.text == engine.chat(PROMPT, "beta", max_new_tokens=N)
    assert reply.prompt_tokens == engine.encode_chat(PROMPT).shape[1]
    assert reply.completion_tokens == len(reply.token_ids) == N and reply.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(engine):
    sampled = [
        engine.chat(PROMPT, "alpha", max_new_tokens=N, temperature=1.0, top_p=0.95, seed=7) for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    assert sampled[0] != engine.chat(PROMPT, "alpha", max_new_tokens=N)  # seeded, so this cannot flake


def test_generation_stops_at_the_templates_end_of_turn_even_when_eos_differs(tiny_model_dir, tmp_path):
    # The model always answers <|im_end|> (ChatML's end of turn), but its tokenizer and generation config
    # say EOS is <|endoftext|>: only reading the chat template finds the real stop token.
    folder = build_constant_model(
        tiny_model_dir, tmp_path / "stopper", "<|im_end|>", eos_token="<|endoftext|>"
    )
    engine = InferenceEngine(str(folder))
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert engine.tokenizer.eos_token_id != im_end and im_end in engine.stop_ids
    reply = engine.start(PROMPT, max_new_tokens=50)
    assert reply.wait() == "" and reply.finish_reason == "stop" and reply.token_ids == [im_end]


def test_a_model_that_never_ends_its_turn_stops_at_max_new_tokens(tiny_model_dir, tmp_path):
    folder = build_constant_model(tiny_model_dir, tmp_path / "talker", "Paris")
    engine = InferenceEngine(str(folder))
    reply = engine.start(PROMPT, max_new_tokens=7)
    assert reply.wait() == "Paris" * 7 and reply.finish_reason == "length" and reply.completion_tokens == 7


def test_stop_ids_collect_config_tokenizer_and_template_tokens(tiny_model_dir):
    from transformers import GenerationConfig

    from lora_studio.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = stop_token_ids(tokenizer, GenerationConfig(eos_token_id=[0, 1]))
    assert ids == [0, 1, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_closing_a_stream_early_stops_generation_and_frees_the_engine(tiny_model_dir, tmp_path):
    engine = InferenceEngine(str(build_constant_model(tiny_model_dir, tmp_path / "talker", "Paris")))
    reply = engine.start(PROMPT, max_new_tokens=200)
    stream = iter(reply)
    next(stream)
    stream.close()  # what a disconnected client does
    assert reply._done.wait(timeout=60)
    assert reply.completion_tokens < 200
    assert engine.chat(PROMPT, max_new_tokens=3) == "Paris" * 3


def test_adapter_trained_on_another_base_is_refused(engine, tiny_adapters, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_adapters["alpha"], other)
    edit_json(other / "lora_studio.json", base_model="some-other-model", base_model_hash="0" * 64)
    with pytest.raises(ModelError, match="trained on base model 'some-other-model'.*retrain"):
        engine.load_adapter("other", other)
    assert "other" not in engine.adapter_names()


def test_pickled_adapter_weights_are_never_loaded(engine, tiny_adapters, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_adapters["alpha"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ModelError, match="no adapter_model.safetensors"):
        engine.load_adapter("pickled", pickled)


def test_names_must_be_new_and_simple(engine, tiny_adapters):
    with pytest.raises(ModelError, match="already taken"):
        engine.load_adapter("alpha", tiny_adapters["alpha"])
    with pytest.raises(ModelError, match="already taken"):
        engine.load_adapter("base", tiny_adapters["alpha"])
    with pytest.raises(ModelError, match="adapter name"):
        engine.load_adapter("has space", tiny_adapters["alpha"])


@pytest.mark.parametrize(
    ("messages", "settings", "message"),
    [
        ([], {}, "non-empty list"),
        ([{"role": "robot", "content": "hi"}], {}, r"messages\[0\].role"),
        ([{"role": "user", "content": 3}], {}, r"messages\[0\].content"),
        (PROMPT, {"max_new_tokens": 0}, "max_new_tokens: expected a positive integer"),
        (PROMPT, {"max_new_tokens": 10_000}, "exceed the model's context of 256 tokens"),
        (PROMPT, {"temperature": 5}, "temperature"),
        (PROMPT, {"top_p": 0}, "top_p"),
    ],
)
def test_bad_requests_are_refused_before_generating(engine, messages, settings, message):
    with pytest.raises(RequestError, match=message):
        engine.start(messages, **settings)


def test_one_generation_settings_object_or_single_fields(engine):
    sampled = GenerationSettings(max_new_tokens=N, temperature=1.0, top_p=0.9, seed=3)
    assert engine.chat(PROMPT, "alpha", sampled) == engine.chat(
        PROMPT, "alpha", max_new_tokens=N, temperature=1.0, top_p=0.9, seed=3
    )
    greedy = "".join(engine.stream_chat(PROMPT, "alpha", sampled, temperature=0))  # a field overrides
    assert greedy == engine.chat(PROMPT, "alpha", max_new_tokens=N)
    assert sampled.generate_kwargs() == {
        "max_new_tokens": N, "do_sample": True, "temperature": 1.0, "top_p": 0.9, "top_k": None
    }  # fmt: skip
    with pytest.raises(RequestError, match="max_new_tokens: .*; top_p: "):  # every problem at once
        GenerationSettings(max_new_tokens=0, top_p=2).check()


def test_unknown_adapter_is_a_model_error_naming_the_loaded_ones(engine):
    with pytest.raises(ModelError, match="unknown adapter 'gamma'; loaded: alpha, beta"):
        engine.chat(PROMPT, "gamma")


def test_from_adapters_reads_the_base_from_the_metadata(tiny_adapters, tiny_model_dir):
    engine = InferenceEngine.from_adapters([tiny_adapters["beta"]])
    assert engine.ref.folder == Path(tiny_model_dir).resolve() and engine.adapter_names() == ["beta"]
    assert (
        adapter_name(Path("/x/runs/support/adapter")) == "support"
        and adapter_name("/x/my adapter") == "my-adapter"
    )


def test_switching_moves_no_base_weights(engine):
    weights = {
        name: (id(p), p.data_ptr()) for name, p in engine._base.named_parameters() if "lora_" not in name
    }
    engine.activate("alpha")
    engine.activate(None)
    engine.activate("beta")  # the benchmark measures how long this takes
    assert {
        name: (id(p), p.data_ptr()) for name, p in engine._base.named_parameters() if "lora_" not in name
    } == weights


def test_cli_chat_answers_one_prompt_and_compares_with_the_base(engine, tiny_adapters, capsys):
    from lora_studio.cli import main

    expected = {name: engine.chat(PROMPT, name, max_new_tokens=N) for name in ["alpha", None]}
    args = ["chat", str(tiny_adapters["alpha"]), "--prompt", PROMPT[0]["content"], "--max-new-tokens", str(N)]
    assert main(args) == 0
    assert capsys.readouterr().out == expected["alpha"] + "\n"
    assert main([*args, "--compare"]) == 0
    assert capsys.readouterr().out == f"[base] {expected[None]}\n[alpha] {expected['alpha']}\n"


def test_cli_chat_interactive_keeps_history_until_reset(engine, tiny_adapters, capsys, monkeypatch):
    import io

    from lora_studio.cli import main

    second_turn = [
        *PROMPT,
        {"role": "assistant", "content": engine.chat(PROMPT, "beta", max_new_tokens=N)},
        {"role": "user", "content": "again"},
    ]
    expected = [
        engine.chat(PROMPT, "beta", max_new_tokens=N),
        engine.chat(second_turn, "beta", max_new_tokens=N),
    ]
    monkeypatch.setattr(
        "sys.stdin", io.StringIO(f"{PROMPT[0]['content']}\nagain\n/reset\n\n{PROMPT[0]['content']}\n")
    )
    assert main(["chat", str(tiny_adapters["beta"]), "--max-new-tokens", str(N)]) == 0  # ends at end of input
    # Compared whole: the random tiny model's answers can hold characters splitlines() breaks on.
    assert capsys.readouterr().out == "".join(
        f"{answer}\n" for answer in [expected[0], expected[1], expected[0]]
    )


def test_a_reply_read_twice_does_not_hang(engine):
    reply = engine.start(PROMPT, "alpha", max_new_tokens=3)
    text = "".join(reply)
    assert reply.wait() == text and list(reply) == []
