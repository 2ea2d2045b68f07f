"""How a reply is generated: the sampling settings, and the tokens that end a reply.

    settings = GenerationSettings(max_new_tokens=64)             # greedy (temperature 0), checked
    model.generate(input_ids, **settings.generate_kwargs(), eos_token_id=stop_token_ids(tokenizer))

Every door that generates (the engine behind chat and serve, evaluation, verify) takes one
`GenerationSettings`, so the settings and their checks are written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import RequestError

DEFAULT_MAX_NEW_TOKENS = 256
MIN_TEMPERATURE = 1e-3  # the smallest positive temperature sampling takes


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample a reply. temperature 0 means greedy (deterministic); a seed makes sampling reproducible."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def problems(self) -> list[str]:
        out = []
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            out.append(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}")
        # a temperature near 0 divides the logits into inf/nan: below MIN_TEMPERATURE, ask for 0 (greedy)
        if not _is_number(self.temperature) or not (
            self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 2
        ):
            out.append(
                f"temperature: expected 0 (greedy) or a number from {MIN_TEMPERATURE} to 2, "
                f"got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            out.append(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            out.append(f"seed: expected a 64-bit integer, got {self.seed!r}")
        return out

    def check(self) -> GenerationSettings:
        """These settings, or a RequestError listing every bad value."""
        problems = self.problems()
        if problems:
            raise RequestError("; ".join(problems))
        return self

    def generate_kwargs(self) -> dict[str, Any]:
        """`model.generate` arguments for these settings (the seed is the caller's to apply)."""
        if self.temperature == 0:  # greedy: unset the sampling knobs a generation config may carry
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        else:
            sampling = {
                "do_sample": True,
                "temperature": float(self.temperature),
                "top_p": float(self.top_p),
                "top_k": None,
            }
        return {"max_new_tokens": self.max_new_tokens, **sampling}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every token that ends a reply: the generation config's EOS ids, the tokenizer's EOS and the
    chat template's end-of-turn token (what the template writes right after an assistant message).

    Models whose EOS differs from their end-of-turn token (e.g. `</s>` vs `<|eot_id|>`) otherwise
    run on past the answer; including both is what keeps generation from running away.
    """
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for token_id in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    for token_id in (tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)):
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant's message, if any."""
    marker = "L0RA-STUDIO-END-MARKER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that refuses this shape: fall back to the EOS ids alone
        return None
    after = text.split(marker, 1)[-1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return ids[0] if ids and ids[0] in special else None
