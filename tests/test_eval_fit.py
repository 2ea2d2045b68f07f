"""The fit check: the verdict rules by hand, then real models ranked and real vs shuffled answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_helpers import chat_rows, taught_tiny_model, write_jsonl

from lora_studio.cli import main
from lora_studio.data import load_examples
from lora_studio.evaluation.baseline import random_copy
from lora_studio.evaluation.fit import (
    check_fit,
    diagnose,
    fit_models,
    guess_language,
    ranking_lines,
    word_overlap,
)
from lora_studio.models import load_tokenizer

REPEAT = [(f"Repeat: word{i % 10}", f"word{i % 10}") for i in range(20)]


# --- the rules -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("score", "loss", "overlap", "languages", "verdict"),
    [
        (0.9, 3.0, 0.0, ("english", "english"), "good fit"),
        (0.6, 3.0, 0.0, ("english", "english"), "partial fit"),
        (0.0, 0.65, 0.2, ("english", "unknown"), "format mismatch"),  # the demo's base: knows, won't write
        (0.1, 2.0, 0.7, ("english", "english"), "format mismatch"),  # right words, wrong form
        (0.1, 2.0, 0.2, ("english", "english"), "task mismatch"),
        (0.0, 6.0, 0.0, ("unknown", "unknown"), "task mismatch"),
        (0.0, 1.5, 0.9, ("french", "english"), "language mismatch"),  # answers in another language
        (0.0, 4.0, 0.1, ("german", "unknown"), "language mismatch"),  # far from a non-English text
    ],
)
def test_diagnose(score, loss, overlap, languages, verdict):
    got, advice = diagnose(score, loss, overlap, *languages)
    assert got == verdict and advice


@pytest.mark.parametrize(
    ("texts", "language"),
    [
        (["What is the capital of France? It is the city of Paris and it is on the Seine."], "english"),
        (
            ["Quelle est la capitale de la France ? C'est Paris, sur la Seine, et pas une autre ville."],
            "french",
        ),
        (["Der Hund ist nicht im Haus und die Katze ist auf dem Dach mit der Maus."], "german"),
        (["Столица России — Москва, крупнейший город страны."], "cyrillic"),
        (['{"name": "Ana Sato", "item": "umbrella", "quantity": 15, "city": "Leeds"}'], "unknown"),
        (["12345"], "unknown"),
    ],
)
def test_guess_language(texts, language):
    assert guess_language(texts) == language


def test_word_overlap_by_hand():
    references = ['{"name": "Ana Sato", "city": "Leeds"}', "the red fox"]
    answers = ["Ana ordered something for Leeds.", "A red dog"]
    # reference 1: ana, sato, leeds -> ana and leeds found (2/3); reference 2: the, red, fox -> red (1/3)
    assert word_overlap(answers, references) == pytest.approx((2 / 3 + 1 / 3) / 2)


# --- real models -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def taught(tiny_model_dir, tmp_path_factory):
    """A tiny model fully trained to repeat words: it does the task zero-shot, like an instruct model."""
    return taught_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("taught"), REPEAT, steps=120)


def test_a_trained_model_ranks_above_the_same_architecture_randomly_initialised(taught, tmp_path):
    random_dir = random_copy(taught, tmp_path / "random", seed=1)
    assert load_tokenizer(random_dir).get_vocab() == load_tokenizer(taught).get_vocab()
    data = write_jsonl(tmp_path / "repeat.jsonl", chat_rows(REPEAT))
    reports, failed = fit_models([str(random_dir), str(taught), str(tmp_path / "nowhere")], data, sample=10)
    assert [r.model for r in reports] == [str(taught), str(random_dir)] and str(
        tmp_path / "nowhere"
    ) in failed
    trained, rand = reports
    assert trained.score.headline > rand.score.headline and trained.fit.loss < rand.fit.loss
    assert trained.verdict in ("good fit", "partial fit") and rand.verdict == "task mismatch"
    assert all(r.seconds > 0 and r.memory_mb > 0 for r in reports)
    lines = ranking_lines(reports, failed)
    assert lines[-1].startswith(f"recommended: {taught}") and "could not be checked" in "\n".join(lines)


def test_shuffled_answers_score_worse_than_real_ones(taught, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(taught), load_tokenizer(taught)
    answers = [a for _, a in REPEAT]
    shuffled = [(q, a) for (q, _), a in zip(REPEAT, answers[3:] + answers[:3], strict=True)]  # all wrong
    real = check_fit(model, tokenizer, load_examples(write_jsonl(tmp_path / "r.jsonl", chat_rows(REPEAT)))[1])
    mixed = check_fit(
        model, tokenizer, load_examples(write_jsonl(tmp_path / "s.jsonl", chat_rows(shuffled)))[1]
    )
    assert mixed.score.headline < real.score.headline
    assert mixed.fit.loss > real.fit.loss + 1.0
    assert mixed.rank_key() < real.rank_key()


def test_fit_command_prints_each_report_and_the_ranking(taught, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "repeat.jsonl", chat_rows(REPEAT))
    assert main(["fit", str(data), "--models", f"{taught},{tiny_model_dir}", "--sample", "6"]) == 0
    out = capsys.readouterr().out
    assert f"fit of {taught} on 6 sampled rows:" in out and "zero-shot exact match" in out
    assert "memory MB" in out and f"recommended: {taught}" in out
    assert main(["fit", str(data), "--models", str(tmp_path / "missing")]) == 2
    assert "model folder not found" in capsys.readouterr().err


# --- the real SmolLM2 ----------------------------------------------------------------------------
DEMO_TRAIN = Path(__file__).resolve().parents[1] / "examples" / "json_extraction" / "train.jsonl"


@pytest.mark.slow
def test_demo_data_is_a_format_mismatch_and_the_instruct_model_beats_a_random_one(use_smollm2_home, tmp_path):
    from lora_studio.models import resolve_base

    instruct = resolve_base("smollm2-135m-instruct").folder
    random_dir = random_copy(instruct, tmp_path / "random-smollm2")
    reports, _ = fit_models([str(random_dir), "smollm2-135m-instruct"], DEMO_TRAIN, sample=12)
    best, rand = reports
    assert best.model == "smollm2-135m-instruct" and rand.model == str(random_dir)
    assert best.verdict == "format mismatch"  # not "partial fit": it gets no record right zero-shot
    assert best.score.headline < 0.2 and best.fit.loss < 1.0
    assert rand.fit.loss > best.fit.loss + 3 and rand.verdict == "task mismatch"
