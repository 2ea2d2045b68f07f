"""The one check for text a tokenizer is about to see, whichever door it came through.

A NUL character or an unpaired surrogate (text that came from a lone "\\ud800" JSON escape, or
bytes decoded with surrogateescape) makes tokenizers fail with a TypeError deep inside; every
place that hands text to a model (data rows, classifier texts, chat messages) calls `check_text`
first, so the person gets one line naming the row or field instead.
"""

from __future__ import annotations

import re

from .errors import DataError, LoraStudioError

BAD_CHARS = re.compile("[\x00\ud800-\udfff]")  # NUL, and surrogates that no UTF-8 text holds


def check_text(
    value: str,
    place: str,
    fix: str = "remove it from the file",
    error: type[LoraStudioError] = DataError,
) -> str:
    """`value` unchanged, or `error` naming `place`, the character and where it is."""
    bad = BAD_CHARS.search(value)
    if bad:
        nul = bad.group() == "\x00"
        what = "a NUL character (\\x00)" if nul else f"an unpaired surrogate (\\u{ord(bad.group()):04x})"
        why = "" if nul else ", which is not valid Unicode"
        raise error(f"{place}: holds {what} at character {bad.start() + 1}{why}; {fix}")
    return value
