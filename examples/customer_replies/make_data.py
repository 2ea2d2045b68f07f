"""Generate a free-text task: turn an agent's terse note into a customer reply in the house style.

    python examples/customer_replies/make_data.py      # rewrites train.jsonl and test.jsonl here

Each row is a chat: a system message, the agent's note and the reply, e.g.
    "#4411 | Mia | late - courier strike | eta fri | comp: 10% voucher"
    -> "Hi Mia, thank you for your patience. Your order 4411 is running late because of a courier
        strike. It should now arrive on Friday. To make up for it, we have added a 10% voucher to
        your account. Kind regards, the Support Team"
The reply is written, not copied: abbreviations become words ("fri" -> "Friday"), each problem
has its own phrasing, and the note's fields come in any order and format. Scored against the
reference by word overlap (F1) and by whether the facts (order, day, compensation) survive.
Used with examples/json_extraction and examples/ticket_routing by benchmarks/quality.py.

Seeded: the committed files are reproducible byte for byte; no test note repeats a training one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 2468
TRAIN_ROWS = 320
TEST_ROWS = 60
SYSTEM = "Write the reply to the customer in our house style, using every fact in the agent's note."

NAMES = (
    "Mia Noah Ana Ben Emma Hiro Ines Kofi Lena Omar Priya Rosa Samir Tara Vera Wei Yara Zoe Liam Olga".split()
)
DAYS = {
    "mon": "Monday",
    "tue": "Tuesday",
    "wed": "Wednesday",
    "thu": "Thursday",
    "fri": "Friday",
    "sat": "Saturday",
}
# (note code, what the reply says happened)
PROBLEMS = [
    ("late - courier strike", "is running late because of a courier strike"),
    ("late - weather", "is delayed by bad weather"),
    ("late - out of stock", "is delayed because one item was out of stock"),
    ("damaged in transit", "was damaged on its way to you, so we are sending a replacement"),
    ("wrong item sent", "contained the wrong item, so we are sending the right one"),
    ("missing item", "was missing an item, which we are sending separately"),
]
# (note code, the sentence offering it)
COMPENSATION = [
    ("10% voucher", "To make up for it, we have added a 10% voucher to your account."),
    ("20% voucher", "To make up for it, we have added a 20% voucher to your account."),
    ("free shipping", "To make up for it, your next order ships for free."),
    ("refund shipping", "To make up for it, we have refunded your shipping costs."),
    ("none", ""),
]
FORMATS = [
    "#{order} | {name} | {problem} | eta {day} | comp: {comp}",
    "order {order} ({name}): {problem}; new eta {day}; comp {comp}",
    "{name} / #{order} / {problem} / eta {day} / {comp}",
    "cust {name}, ord {order} - {problem}, arrives {day}, compensation: {comp}",
]


def make_row(rng: random.Random) -> tuple[dict, str]:
    order, name = rng.randint(1000, 9999), rng.choice(NAMES)
    problem_code, problem = rng.choice(PROBLEMS)
    comp_code, comp = rng.choice(COMPENSATION)
    day_code = rng.choice(list(DAYS))
    note = rng.choice(FORMATS).format(
        order=order, name=name, problem=problem_code, day=day_code, comp=comp_code
    )
    sentences = [
        f"Hi {name}, thank you for your patience.",
        f"Your order {order} {problem}.",
        f"It should now arrive on {DAYS[day_code]}.",
        comp,
        "Kind regards, the Support Team",
    ]
    reply = " ".join(s for s in sentences if s)
    row = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": note},
            {"role": "assistant", "content": reply},
        ]
    }
    return row, note


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < TRAIN_ROWS + TEST_ROWS:
        row, note = make_row(rng)
        if note not in seen:
            seen.add(note)
            rows.append(row)
    return rows[:TRAIN_ROWS], rows[TRAIN_ROWS:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    train, test = generate()
    write_jsonl(HERE / "train.jsonl", train)
    write_jsonl(HERE / "test.jsonl", test)
    print(f"wrote {len(train)} training rows and {len(test)} test rows to {HERE}")


if __name__ == "__main__":
    main()
