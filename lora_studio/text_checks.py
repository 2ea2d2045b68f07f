"""Text hygiene in one place: the check for text a tokenizer is about to see, control characters
in names, and cells of CSV files we write.

A NUL character or an unpaired surrogate (text that came from a lone "\\ud800" JSON escape, or
bytes decoded with surrogateescape) makes tokenizers fail with a TypeError deep inside; every
place that hands text to a model (data rows, classifier texts, chat messages) calls `check_text`
first, so the person gets one line naming the row or field instead.

Names (of runs and jobs) may not hold control characters: an ESC sequence printed to a terminal
can rewrite what it shows. Recipes refuse them, and `printable` escapes them when a name read
back from an index (written by anyone, or before this rule) is printed. A CSV cell starting with
=, +, -, @ (or a tab or carriage return) is a formula to a spreadsheet; `csv_cell` makes it text,
as OWASP advises.
"""

from __future__ import annotations

import re

from .errors import DataError, LoraStudioError

BAD_CHARS = re.compile("[\x00\ud800-\udfff]")  # NUL, and surrogates that no UTF-8 text holds
# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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


def printable(text: object) -> str:
    """`text` with every control character shown escaped (ESC as \\x1b), safe to print to a terminal."""
    return CONTROL_CHARS.sub(lambda m: ascii(m.group())[1:-1], str(text))


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a string starting a formula gets a leading quote."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
