"""`max_length: auto` for task: classify: the token limit chosen from the training texts' lengths.

    bound = reading_bound(recipe.data.max_length, tokenizer)    # what files are read and first encoded at
    choice = choose_max_length(lengths, overhead, bound)         # -> LengthChoice; choice.line() is logged
    max_length = recorded_max_length(lora_studio_json)           # every later door: the value training used

A classifier reads each text inside its prompt (prompt.py) and batches pad only to their longest
row, so a high max_length costs nothing for short texts; what it decides is where a long text is
cut, in training and in every later use. `auto` takes the 99th percentile of the training rows'
full lengths (prompt + text), rounded up to a multiple of 64, so a few outliers do not set it; never
below the old default of 512, so no text is read shorter than before (a lower limit would save no
time, only cut long texts at inference); and never above 2048 or the base's positions. A resumed run
chooses again from the same rows and tokenizer, so it gets the same value; lora_studio.json records it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUTO = "auto"
PERCENTILE = 99
ROUND_TO = 64
FLOOR = 512  # the default before `auto`: reading less would save no time (dynamic padding)
CAP = 2048  # attention's cost grows with the square of the length; set max_length to go beyond
TEXT_ROOM = 16  # tokens of text kept at least, beyond the prompt
DEFAULT = 512  # what adapters that recorded nothing were trained with


@dataclass(frozen=True)
class LengthChoice:
    """The max_length `auto` chose, and the figures it was chosen from (for the log and the report)."""

    max_length: int
    percentile: int  # the PERCENTILE-th percentile of the training rows' lengths, in tokens
    longest: int
    rows: int
    cap: int

    def line(self) -> str:
        return (
            f"max_length: {self.max_length} tokens, chosen from the data: the {PERCENTILE}th percentile of "
            f"{self.rows} training rows is {self.percentile} tokens (longest {self.longest}), rounded up to "
            f"a multiple of {ROUND_TO} within {min(FLOOR, self.cap)}-{self.cap}; set data.max_length to choose"
        )


def position_limit(tokenizer: Any) -> int | None:
    """The base's max_position_embeddings, from the config.json beside its tokenizer (training loads
    both from the base's folder); None when there is none to read."""
    folder = getattr(tokenizer, "name_or_path", None)
    if not folder:  # a tokenizer built in memory (not the shell's folder: Path("") is ".")
        return None
    try:
        values = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict):
        return None
    positions = values.get("max_position_embeddings") or values.get("n_positions")
    return positions if isinstance(positions, int) and positions > 0 else None


def reading_bound(setting: int | str, tokenizer: Any = None) -> int:
    """The max_length texts are read and first encoded at: the setting, or under `auto` the cap."""
    if setting != AUTO:
        return int(setting)
    return min(CAP, position_limit(tokenizer) or CAP)


def choose_max_length(lengths: Sequence[int], overhead: int, cap: int) -> LengthChoice:
    """The limit for rows of these full lengths (prompt included) read in a prompt of `overhead` tokens."""
    ordered = sorted(lengths)
    percentile = ordered[max(0, math.ceil(len(ordered) * PERCENTILE / 100) - 1)]  # nearest rank
    wanted = max(percentile, overhead + TEXT_ROOM, FLOOR)
    chosen = min(cap, -(-wanted // ROUND_TO) * ROUND_TO)
    return LengthChoice(chosen, percentile, ordered[-1], len(ordered), cap)


def recorded_max_length(metadata: dict[str, Any]) -> int:
    """The max_length a classifier was trained with: what `lora_studio.json` records for it, else
    (adapters before `auto`) its recipe's, else the default."""
    trained = (metadata.get("classification") or {}).get("max_length")
    recipe = ((metadata.get("recipe") or {}).get("data") or {}).get("max_length")
    return next((n for n in (trained, recipe) if type(n) is int and n > 0), DEFAULT)
