"""How a classifier reads a text: inside the base's chat template, with a short instruction.

    prompt = choose_prompt("auto", labels, tokenizer)        # at training time; recorded in lora_studio.json
    prompt = ClassifyPrompt.from_metadata(meta)              # every later door: classify, serve, merge, verify
    prompt.encode(text, tokenizer, max_length)               # -> {"input_ids", "length", "truncated"}

The head reads the final hidden state at the last token. Given the bare text, that state is the
base's guess at how the text goes on. Given the text as a user turn of the base's own chat
template, after a system line such as "Classify the text. Answer with one of: billing, shipping.",
and with the assistant's turn opened, the last token is where the instruct model starts its
answer: the state that asks "which label". The idea is the verbalizer of PET / LM-BFF, but with one
forward pass and no answer to parse. Measured on SmolLM2-135M-Instruct (benchmarks/classify_sets,
the frozen base's last-token features, a fitted linear head, held-out rows): words 70% -> 80%,
opaque ids 50% -> 64%, long e-mails 56% -> 78%.

This module is the only place a text becomes token ids for a classifier, so training, evaluation,
`classify`, `/v1/classify`, merge and verify see the same tokens. Only the text is cut at
max_length; the prompt around it stays whole (the assistant turn at the end is what the head reads).
An adapter trained before prompts records none: it reads bare texts as it always did.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

PromptSetting = Literal["auto", "none"]
LIST_LABELS_UP_TO = 12  # the instruction names the labels when there are this few, all words
WORD_LABEL = re.compile(r"[A-Za-z][A-Za-z _'-]*")
SLOT = "\x00TEXT\x00"  # where the text goes in the rendered template; cannot occur in a checked text


@dataclass(frozen=True)
class ClassifyPrompt:
    """The template text before and after the text (empty: the bare text, as adapters before prompts)."""

    before: str = ""
    after: str = ""
    instruction: str = ""  # the system line, for people reading the metadata

    @property
    def plain(self) -> bool:
        return not (self.before or self.after)

    def to_dict(self) -> dict[str, str] | None:
        return None if self.plain else asdict(self)

    @classmethod
    def from_metadata(cls, classification: dict[str, Any] | None) -> ClassifyPrompt:
        """The prompt an adapter (or merged folder) recorded; none recorded: the bare text."""
        recorded = (classification or {}).get("prompt") or {}
        return cls(recorded.get("before", ""), recorded.get("after", ""), recorded.get("instruction", ""))

    def encode(self, text: str, tokenizer: Any, max_length: int) -> dict[str, Any]:
        """Token ids of one text inside the prompt; only the text is cut, at its end, to fit max_length."""
        if self.plain:
            ids = tokenizer(text)["input_ids"]
            return {"input_ids": ids[:max_length], "length": len(ids), "truncated": len(ids) > max_length}
        before, after = _ids(tokenizer, self.before), _ids(tokenizer, self.after)
        body = _ids(tokenizer, text)
        room = max(0, max_length - len(before) - len(after))
        ids = before + body[:room] + after
        return {
            "input_ids": ids,
            "length": len(before) + len(body) + len(after),
            "truncated": len(body) > room,
        }

    def prefix_ids(self, tokenizer: Any) -> list[int]:
        """The tokens every encoded text starts with (what comes before the text)."""
        return _ids(tokenizer, self.before)

    def encode_batch(self, texts: Sequence[str], tokenizer: Any, max_length: int) -> dict[str, Any]:
        """Right-padded tensors (input_ids, attention_mask) of `texts`, for the model's forward pass."""
        import torch

        rows = [self.encode(t, tokenizer, max_length)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, row in enumerate(rows):
            ids[j, : len(row)], mask[j, : len(row)] = torch.as_tensor(row, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask}


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def instruction(labels: Sequence[str]) -> str:
    """The system line: the label names when they are a few words, else the bare request."""
    if len(labels) <= LIST_LABELS_UP_TO and all(WORD_LABEL.fullmatch(label) for label in labels):
        return "Classify the text. Answer with one of: " + ", ".join(labels) + "."
    return "Classify the text. Answer with its label."


def choose_prompt(
    setting: PromptSetting, labels: Sequence[str], tokenizer: Any, max_length: int
) -> ClassifyPrompt:
    """`auto`: the base's chat template around the text, unless the tokenizer has none or the prompt
    would take more than half of max_length (then the bare text, said in one line)."""
    if setting == "none":
        return ClassifyPrompt()
    if not getattr(tokenizer, "chat_template", None):
        log.info("classify prompt: none (the tokenizer has no chat template); the head reads the bare text")
        return ClassifyPrompt()
    line = instruction(labels)
    messages = [{"role": "system", "content": line}, {"role": "user", "content": SLOT}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered.count(SLOT) != 1:  # a template that rewrites the user's text: keep to the bare text
        log.info("classify prompt: none (the chat template does not keep the text as given)")
        return ClassifyPrompt()
    before, after = rendered.split(SLOT)
    prompt = ClassifyPrompt(before, after, line)
    overhead = len(_ids(tokenizer, before)) + len(_ids(tokenizer, after))
    if overhead > max_length // 2:
        log.info(
            "classify prompt: none (the prompt takes %d of max_length=%d tokens); the head reads the bare text",
            overhead,
            max_length,
        )
        return ClassifyPrompt()
    log.info("classify prompt: the chat template (%d tokens) with the system line %r", overhead, line)
    return prompt
