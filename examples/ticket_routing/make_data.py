"""Generate a label task: route a customer support ticket to one of five teams.

    python examples/ticket_routing/make_data.py      # rewrites train.jsonl and test.jsonl here

Each row is a chat: a system message naming the teams, the customer's ticket and the team's name
as the whole answer, e.g.
    "I was charged twice for order 5521, please refund one of the payments." -> billing
Tickets borrow each other's words (a refund can be billing or returns, a parcel can be shipping
or returns), so the label follows what the customer asks for, not a keyword. Used with
examples/json_extraction (extraction) and examples/customer_replies (free text) to choose the
default recipe by held-out task scores (benchmarks/quality.py).

Seeded: the committed files are reproducible byte for byte; no test ticket repeats a training one,
and half the test tickets use a wording (template) that training never shows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 4321
TRAIN_ROWS = 320
TEST_ROWS = 80
TEAMS = ("billing", "shipping", "returns", "technical", "account")
SYSTEM = "Route the support ticket to one team: " + ", ".join(TEAMS) + ". Answer with the team name only."

PRODUCTS = [
    "desk lamp", "coffee grinder", "phone charger", "yoga mat", "water bottle", "backpack", "table fan",
    "teapot", "bike helmet", "alarm clock", "umbrella", "rain jacket", "laptop stand", "kettle", "blender",
    "headset", "keyboard", "smart plug",
]  # fmt: skip
OPENERS = ("", "Hi, ", "Hello, ", "Hey team, ", "Good morning, ", "Urgent: ")
CLOSERS = ("", " Thanks.", " Thank you!", " Please help.", " Regards, a customer.")
TEMPLATES = {
    "billing": [
        "I was charged twice for order {order}, please refund one of the payments.",
        "my card shows a payment of {amount} euros that I never made.",
        "the invoice for order {order} has the wrong VAT number.",
        "why did my subscription price go up to {amount} euros this month?",
        "I used a discount code but was charged the full {amount} euros for the {product}.",
        "can I pay for order {order} by bank transfer instead of card?",
        "the refund for my returned {product} was {amount} euros short.",
    ],
    "shipping": [
        "order {order} has not arrived and tracking has not moved for {days} days.",
        "the courier left my {product} at the wrong address.",
        "can you deliver order {order} to my office instead of my home?",
        "tracking says delivered but there is no parcel at my door.",
        "how long does shipping to Norway take for the {product}?",
        "my parcel with the {product} is stuck at customs for {days} days.",
        "can I change the delivery date of order {order} to next week?",
    ],
    "returns": [
        "the {product} arrived broken and I want to send it back.",
        "I would like to return the {product} from order {order}, it is the wrong colour.",
        "how do I get a return label for the {product}?",
        "the {product} is too small, can I exchange it for a bigger one?",
        "I sent back the {product} {days} days ago, has the parcel reached you?",
        "the {product} does not match the photo, I want my money back and to return it.",
        "can I return order {order} after {days} days?",
    ],
    "technical": [
        "the {product} will not turn on even after charging it overnight.",
        "my {product} keeps disconnecting from the app every few minutes.",
        "the firmware update for the {product} failed halfway.",
        "how do I reset the {product} to factory settings?",
        "the app crashes when I try to pair the {product}.",
        "the {product} makes a loud noise since the last update.",
        "the display of my {product} flickers after {days} days of use.",
    ],
    "account": [
        "I cannot log in, the password reset email never arrives.",
        "please delete my account and all my data.",
        "how do I change the email address on my account?",
        "someone else placed order {order} from my account.",
        "I want to merge my two accounts into one.",
        "please unsubscribe me from the newsletter but keep my account.",
        "my account is locked after {days} failed login attempts.",
    ],
}


def make_row(rng: random.Random, team: str, test: bool) -> tuple[dict, str]:
    """One ticket for `team`; the last template of each team is kept for test rows (half of them)."""
    templates = TEMPLATES[team]
    template = templates[-1] if test and rng.random() < 0.5 else rng.choice(templates[:-1])
    body = template.format(
        order=rng.randint(1000, 9999),
        amount=rng.choice([9, 12, 19, 24, 35, 49, 60, 89, 120]),
        product=rng.choice(PRODUCTS),
        days=rng.randint(2, 21),
    )
    opener = rng.choice(OPENERS)
    ticket = opener + (body if opener else body[0].upper() + body[1:]) + rng.choice(CLOSERS)
    row = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": ticket},
            {"role": "assistant", "content": team},
        ]
    }
    return row, ticket


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Balanced unique tickets (every team equally often) for train and test.

    Half the test tickets use a wording never seen in training: the score shows whether the
    model learned what each team does, not just which sentences map to it.
    """
    rng = random.Random(seed)
    splits: dict[bool, list[dict]] = {False: [], True: []}
    seen: set[str] = set()
    for test, size in ((False, TRAIN_ROWS), (True, TEST_ROWS)):
        while len(splits[test]) < size:
            row, ticket = make_row(rng, TEAMS[len(splits[test]) % len(TEAMS)], test)
            if ticket not in seen:
                seen.add(ticket)
                splits[test].append(row)
        rng.shuffle(splits[test])
    return splits[False], splits[True]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    train, test = generate()
    write_jsonl(HERE / "train.jsonl", train)
    write_jsonl(HERE / "test.jsonl", test)
    print(f"wrote {len(train)} training rows and {len(test)} test rows to {HERE}")


if __name__ == "__main__":
    main()
