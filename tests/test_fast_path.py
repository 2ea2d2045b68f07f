"""The fast path's shortcuts compute what the plain path computes (tiny model; tolerances stated)."""

import json
import logging
from pathlib import Path

import pytest
import torch

from lora_studio import Recipe, feature_cache, label_loss, train
from lora_studio import fast_path as fp
from lora_studio.adapters import attach_lora, decoder_blocks
from lora_studio.config import DataSettings, LoraSettings, ModelSettings
from lora_studio.data import IGNORE_INDEX, prepare
from lora_studio.models import load_base


@pytest.fixture
def varied_file(tmp_path):
    """Chat rows of different lengths, so batches carry padding."""
    rows = []
    for i in range(40):
        words = " ".join(f"word{(i + k) % 10}" for k in range(1 + i % 6))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Repeat: {words}"},
                    {"role": "assistant", "content": words},
                ]
            }
        )
    path = tmp_path / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def lora_model(tiny_model_dir, varied_file):
    """The tiny model with LoRA on its top block (non-zero B, so every LoRA weight gets a gradient)."""
    model, tokenizer, _ = load_base(ModelSettings(base_model=str(tiny_model_dir)))
    torch.manual_seed(0)
    model = attach_lora(model, LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0, layers=1))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    data = prepare(DataSettings(train_file=str(varied_file), max_length=64), tokenizer)
    return model, tokenizer, data


def loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def plain_loss(model, rows, pad_id):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for j, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[j, :n], mask[j, :n], labels[j, :n] = torch.tensor(r["input_ids"]), 1, torch.tensor(r["labels"])
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def compare(levers, lora_model):
    model, tokenizer, data = lora_model
    rows = data.train[:6]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # padding is part of the test
    plain = loss_and_grads(model, lambda: plain_loss(model, rows, tokenizer.pad_token_id))
    fast = fp.FastPath(model, levers, tokenizer.pad_token_id, data.train + data.val, len(data.train))
    if levers.cache:
        fast.use_cache(1, "test")
    if levers.label_only:
        fast.swap_head()
    batch = fast.collate([{**r, "row": i} for i, r in enumerate(rows)])
    return plain, loss_and_grads(model, lambda: fast.fast_loss(batch))


def assert_grads_close(got, want, rtol):
    assert got.keys() == want.keys() and len(want) == 14  # 7 linear layers x (A, B) in the top block
    for name in want:
        scale = want[name].abs().max()
        assert scale > 0, name
        assert (got[name] - want[name]).abs().max() <= rtol * scale, name


def test_cached_lower_block_features_give_the_plain_loss_and_lora_gradients(lora_model):
    """Tolerance: features are stored in fp16 (relative rounding 5e-4), so the loss agrees to 1e-4
    relative and every LoRA gradient to 2e-3 of its largest entry (measured: 3e-4)."""
    (plain, plain_grads), (fast, fast_grads) = compare(fp.Levers(cache=True), lora_model)
    assert fast == pytest.approx(plain, rel=1e-4)
    assert_grads_close(fast_grads, plain_grads, rtol=2e-3)


def test_label_only_logits_give_the_full_loss_and_gradients(lora_model):
    """Exact up to fp32 rounding: loss to 1e-6 relative, gradients to 1e-5 of the largest entry."""
    (plain, plain_grads), (fast, fast_grads) = compare(fp.Levers(label_only=True), lora_model)
    assert fast == pytest.approx(plain, rel=1e-6)
    assert_grads_close(fast_grads, plain_grads, rtol=1e-5)


def test_the_check_computes_the_label_rows_in_fp32_when_bf16_is_on(lora_model):
    """With label_only and bf16 the label rows' projection runs in bf16 in training; the check before
    training must leave it out, as it leaves autocast out (on SmolLM2 with one-word answers the bf16
    projection moved the loss by 0.28% and the check sent chat to the plain path, 3.8x slower)."""
    model, tokenizer, data = lora_model
    rows = data.train[:6]
    plain = plain_loss(model, rows, tokenizer.pad_token_id).item()
    fast = fp.FastPath(model, fp.Levers(label_only=True, bf16=True), tokenizer.pad_token_id, data.train, 6)
    fast.swap_head()
    batch = fast.collate([{**r, "row": i} for i, r in enumerate(rows)])
    with torch.no_grad():
        assert fast.fast_loss(batch, bf16=False).item() == pytest.approx(plain, rel=1e-6)
        assert fast.fast_loss(batch).item() != pytest.approx(plain, rel=1e-6)  # the training loss: bf16
    fast.restore()
    assert fast.check_against_plain() is None


def test_label_only_loss_in_chunks_matches_full_cross_entropy(monkeypatch):
    torch.manual_seed(0)
    vocab, dim = 50, 8
    hidden = torch.randn(3, 7, dim, requires_grad=True)
    weight, bias = torch.randn(vocab, dim), torch.randn(vocab)
    labels = torch.randint(0, vocab, (3, 7))
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    monkeypatch.setattr(label_loss, "CHUNK_ELEMENTS", 2 * vocab)  # 2 rows per chunk: 5 chunks

    full = torch.nn.functional.cross_entropy(
        (hidden @ weight.T + bias)[:, :-1].reshape(-1, vocab),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    (want,) = torch.autograd.grad(full, hidden)
    got_loss = label_loss.label_only_loss(hidden, labels, weight, bias)
    (got,) = torch.autograd.grad(got_loss, hidden)
    assert got_loss.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(got, want, atol=1e-7)
    summed = label_loss.label_only_loss(hidden, labels, weight, bias, num_items=1)
    assert summed.item() == pytest.approx(full.item() * int((labels[:, 1:] != IGNORE_INDEX).sum()), rel=1e-6)


def test_the_fast_path_trains_like_the_plain_path(tiny_model_dir, varied_file, tmp_path):
    """Same data order, LoRA dropout masks and updates: the same curve (fp16 features: 1e-3)."""

    def run(name, speedups):
        recipe = Recipe.from_dict(
            {
                "model": {"base_model": str(tiny_model_dir)},
                "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "layers": 1},
                "data": {"train_file": str(varied_file), "max_length": 64},
                "train": {
                    "output_dir": str(tmp_path / name),
                    "max_steps": 6,
                    "per_device_train_batch_size": 4,
                    "eval_every_steps": 3,
                    "logging_steps": 1,
                    "learning_rate": 5e-3,
                    "speedups": speedups,
                },
            }
        )
        result = train(recipe)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        return result, [
            (r["step"], r.get("loss", r.get("val_loss"))) for r in rows if "loss" in r or "val_loss" in r
        ]

    plain, plain_curve = run("plain", "none")
    fast, fast_curve = run("fast", ["cache", "label_only"])
    assert [s for s, _ in fast_curve] == [s for s, _ in plain_curve]
    assert [v for _, v in fast_curve] == pytest.approx([v for _, v in plain_curve], abs=1e-3)
    assert fast.metrics["tokens_per_second"] > 0
    assert sorted(p.name for p in fast.adapter_dir.iterdir()) == sorted(
        p.name for p in plain.adapter_dir.iterdir()
    )


def test_a_resumed_run_with_a_disk_cache_matches_an_uninterrupted_one(
    tiny_recipe, tmp_path, monkeypatch, caplog
):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 6:  # after checkpoint-5: epoch 1 (5 steps) filled the cache
                raise RuntimeError("simulated crash")

    monkeypatch.setattr(feature_cache, "MEMORY_LIMIT_BYTES", 0)  # every cache goes to disk
    # An epoch is 5 steps. (Resuming inside a later epoch changes the data order on either path:
    # the Trainer's length-grouped sampler draws it from the RNG state at the epoch's start.)
    recipe = tiny_recipe.replace(
        output_dir=str(tmp_path / "crashed"), max_steps=9, per_device_train_batch_size=8, eval_every_steps=5
    )
    recipe = recipe.replace(layers=1, speedups=["cache", "label_only"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, callbacks=[Crash()])
    with caplog.at_level(logging.INFO, logger="lora_studio.feature_cache"):
        resumed = train(recipe, resume=True)
    assert "read from" in caplog.text  # the resumed run computed no features
    straight = train(recipe.replace(output_dir=str(tmp_path / "straight")))

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert list(losses(resumed.run_dir)) == list(range(1, 10))
    assert losses(resumed.run_dir) == pytest.approx(losses(straight.run_dir), abs=1e-4)
    assert resumed.metrics["val_loss"] == pytest.approx(straight.metrics["val_loss"], abs=1e-4)


def fake_lower(calls):
    def lower(ids, mask):  # feature = half the token id, 4 times
        calls.append(len(ids))
        return ids[..., None].float().expand(*ids.shape, 4) * 0.5

    return lower


def test_the_cache_fills_as_rows_come_and_is_reused_for_the_same_tokens():
    rows, calls = [[1, 2, 3], [4, 5], [6]], []
    key = feature_cache.cache_key(rows, base="b", lower_blocks=2)
    cache = feature_cache.FeatureCache(key, rows, 4, fake_lower(calls), limit_bytes=0)  # on disk
    assert [r.tolist() for r in cache.rows([1])] == [[[2.0] * 4, [2.5] * 4]] and calls == [1]
    assert cache.rows([1, 0])[1].tolist() == [[0.5] * 4, [1.0] * 4, [1.5] * 4] and calls == [1, 1]
    assert not (cache.folder / "meta.json").exists()  # incomplete: not kept
    cache.rows([2])
    assert (cache.folder / "meta.json").is_file()  # complete: kept for the next run
    again = feature_cache.FeatureCache(key, rows, 4, fake_lower(calls), limit_bytes=0)
    assert again.rows([2, 0])[0].tolist() == [[3.0] * 4] and calls == [1, 1, 1]  # nothing computed


def test_the_cache_is_rebuilt_when_the_tokens_base_or_blocks_change():
    rows, calls = [[1, 2, 3], [4, 5], [6]], []
    key = feature_cache.cache_key(rows, base="b", lower_blocks=2)
    feature_cache.FeatureCache(key, rows, 4, fake_lower(calls), limit_bytes=0).rows([0, 1, 2])
    changed = [[1, 2, 3], [4, 5], [7]]  # one token of the data changed
    other_keys = {
        feature_cache.cache_key(changed, base="b", lower_blocks=2),
        feature_cache.cache_key(rows, base="c", lower_blocks=2),
        feature_cache.cache_key(rows, base="b", lower_blocks=3),
    }
    assert len(other_keys | {key}) == 4
    new = feature_cache.FeatureCache(
        feature_cache.cache_key(changed, base="b", lower_blocks=2),
        changed,
        4,
        fake_lower(calls),
        limit_bytes=0,
    )
    assert new.rows([2])[0].tolist() == [[3.5] * 4] and len(calls) == 2  # computed again


def test_features_beyond_fp16_range_are_stored_in_fp32():
    rows = [[1, 2], [3]]
    cache = feature_cache.FeatureCache(
        "k", rows, 2, lambda ids, mask: ids[..., None].float().expand(*ids.shape, 2) * 1e5
    )
    assert cache.rows([1])[0].tolist() == [[3e5, 3e5]]
    assert cache.values.dtype == torch.float32 and cache.rows([0])[0].tolist() == [[1e5, 1e5], [2e5, 2e5]]


def test_levers_that_are_not_exact_here_are_ruled_out_with_one_line_each(
    lora_model, tiny_recipe, monkeypatch, caplog
):
    model = lora_model[0]
    with caplog.at_level(logging.INFO, logger="lora_studio.fast_path"):
        levers = fp.choose_levers(tiny_recipe.replace(layers=1), model, not_for_task=fp.NOT_FOR_CHAT)
    assert levers == fp.Levers(cache=True, label_only=True, bf16=False, prefix=False)
    assert "no bf16" in caplog.text  # this CPU lacks native bf16, or the tiny model is too narrow for it
    assert "no prefix: chat rows run whole" in caplog.text  # a classify lever

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_studio.fast_path"):
        assert not fp.choose_levers(tiny_recipe, model).cache
        assert not fp.choose_levers(tiny_recipe.replace(layers=2), model).cache  # both blocks
        assert not fp.choose_levers(tiny_recipe.replace(layers=1, gradient_checkpointing="on"), model).cache
    assert "every block is adapted" in caplog.text and "gradient_checkpointing is on" in caplog.text

    monkeypatch.setattr(fp, "cpu_has_native_bf16", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_studio.fast_path"):
        assert not fp.choose_levers(tiny_recipe.replace(speedups=["bf16"]), model).bf16
    assert "no native bf16" in caplog.text
    assert fp.choose_levers(tiny_recipe.replace(speedups="none"), model) == fp.Levers()
    assert fp.choose_levers(tiny_recipe.replace(speedups=["prefix"]), model) == fp.Levers(prefix=True)

    caplog.clear()  # its general-text score runs the whole model, which cache and label_only cut short
    with caplog.at_level(logging.INFO, logger="lora_studio.fast_path"):
        levers = fp.choose_levers(tiny_recipe.replace(layers=1, select_best="balanced"), model)
    assert not levers.cache and not levers.label_only and "select_best: balanced" in caplog.text


def test_cached_features_turn_activation_checkpointing_off(lora_model, tmp_path):
    from transformers import TrainingArguments

    model, tokenizer, data = lora_model
    fast = fp.FastPath(model, fp.Levers(cache=True), tokenizer.pad_token_id, data.train, len(data.train))
    fast.use_cache(1, "test")
    args = TrainingArguments(output_dir=str(tmp_path), activation_checkpointing=True, use_cpu=True)
    assert not fast.trainer(args, tokenizer, []).args.activation_checkpointing  # nothing left to recompute


def test_a_fast_loss_that_differs_from_the_plain_one_falls_back_to_the_plain_path(
    lora_model, tiny_recipe, monkeypatch
):
    model, tokenizer, data = lora_model
    run_lower = fp.FastPath._run_lower

    def wrong(self, *args, **kw):  # features that are not what the model's forward computes
        return run_lower(self, *args, **kw).flip(1)

    monkeypatch.setattr(fp.FastPath, "_run_lower", wrong)
    with torch.no_grad():  # sharper predictions: a random model's loss barely depends on its input
        model.get_base_model().lm_head.weight *= 30
    _, blocks = decoder_blocks(model)
    before = list(blocks)
    assert (
        fp.prepare(tiny_recipe.replace(layers=1), model, tokenizer, data, Path(tiny_recipe.model.base_model))
        is None
    )
    assert list(blocks) == before and type(model.get_base_model().lm_head).__name__ == "Linear"
    monkeypatch.setattr(fp.FastPath, "_run_lower", run_lower)
    assert fp.prepare(
        tiny_recipe.replace(layers=1), model, tokenizer, data, Path(tiny_recipe.model.base_model)
    )
