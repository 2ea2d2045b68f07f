"""Generate the classification demo data: customer messages to route to one of four teams.

    python examples/classification/make_data.py      # rewrites train.csv and test.csv here

Each row is a `text` and a `label` (account, billing, shipping, technical), e.g.
    "Hi, I was charged twice for order 4821 this month. Can you refund one of them?" -> billing
Every team has many sentence shapes (questions, complaints, terse notes, polite requests) filled
with varied details, and greetings and sign-offs come and go. Words overlap between teams on
purpose ("order" is billing or shipping, "account" is account or billing), so no single keyword
decides the label. The test rows are held out: half use sentence shapes training never shows,
and no test text appears in training.

The generator is seeded, so the committed files are reproducible byte for byte.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 2024
TRAIN_PER_LABEL = 100
TEST_PER_LABEL = 30
HELD_OUT_SHAPES = 3  # the last shapes of each team appear in test rows only

SLOTS = {
    "order": [str(n) for n in range(1000, 9999, 37)],
    "amount": ["12.99", "49.00", "7.50", "120.00", "35.20", "89.95", "15.00", "230.10"],
    "item": [
        "the blue kettle",
        "my headphones",
        "the desk chair",
        "two lamps",
        "the running shoes",
        "a gift card",
        "the phone case",
        "the winter coat",
        "my new printer",
        "the coffee grinder",
    ],  # fmt: skip
    "days": ["three days", "a week", "ten days", "two weeks", "over a month", "five days"],
    "carrier": ["the courier", "the delivery driver", "the post office", "the tracking page"],
    "device": ["my iPhone", "my Android phone", "the Windows app", "my Mac", "the tablet app", "Chrome"],
    "error": ["error 503", "a blank white screen", "'something went wrong'", "a spinning wheel", "code E42"],
    "feature": ["the search", "the checkout page", "notifications", "the settings page", "login with Google"],
    "month": ["January", "March", "last month", "this month", "May", "October"],
}
SHAPES = {
    "billing": [
        "I was charged twice for order {order} {month}. Can you refund one of them?",
        "Why does my card statement show {amount} from you when I cancelled?",
        "The invoice for order {order} has the wrong amount, it should be {amount}.",
        "Please refund the {amount} you took for {item}, I returned it {days} ago.",
        "my payment keeps getting declined at checkout even though the card works elsewhere",
        "Can I get a copy of the receipt for order {order}? My accountant needs it.",
        "You billed me {amount} for a subscription I never signed up for.",
        "The discount code was not applied and I paid full price, {amount}.",
        "How do I change the credit card used for my monthly plan?",
        "Still waiting on the refund for order {order}, it has been {days}.",
        "I see a pending charge of {amount} that I do not recognise.",
        "Is VAT included in the {amount} price or added later?",
        "Charged {amount} in {month} but the plan says it costs less. Please explain.",
        "The refund went to an old card that is closed now. What happens to the money?",
    ],
    "shipping": [
        "Where is my package? Order {order} was supposed to arrive {days} ago.",
        "{carrier} says delivered but nothing came to my door.",
        "Can you ship {item} to a different address? I moved.",
        "Order {order} has been stuck in transit for {days}.",
        "The box arrived crushed and {item} inside is damaged.",
        "how long does delivery to Canada usually take",
        "I only got part of order {order}, {item} is missing.",
        "Can I pick up {item} at a store instead of waiting for delivery?",
        "The tracking number for order {order} does not work on {carrier}.",
        "Do you deliver on weekends? I am not home during the week.",
        "My parcel went to the wrong city according to {carrier}.",
        "Could you upgrade order {order} to express shipping?",
        "It has been {days} and {item} still has not shipped.",
        "The courier left {item} outside in the rain, can you send another?",
    ],
    "technical": [
        "The app crashes every time I open {feature} on {device}.",
        "I get {error} when I try to load {feature}.",
        "{feature} is extremely slow on {device}, pages take forever.",
        "After the update, {device} shows {error} on start.",
        "Buttons on {feature} do nothing when I tap them.",
        "images do not load anywhere on the site since {month}",
        "Is there a known outage? Everything shows {error}.",
        "{feature} freezes on {device} and I have to restart it.",
        "The page layout is broken on {device}, text overlaps.",
        "Sync between {device} and the website stopped working.",
        "I keep getting logged out of {feature} every few minutes on {device}.",
        "Dark mode makes the text unreadable in {feature}.",
        "Video on the product page does not play on {device}, just {error}.",
        "Every search returns {error} since yesterday.",
    ],
    "account": [
        "I forgot my password and the reset email never arrives.",
        "How do I change the email address on my account?",
        "Please delete my account and all my data.",
        "Someone else logged into my account from another country.",
        "I want to merge my two accounts into one.",
        "can't sign in, it says my account is locked",
        "How do I turn on two-factor authentication?",
        "I need to update the name on my profile, I got married.",
        "My account was suspended without any explanation.",
        "I did not get the verification code to confirm my phone number.",
        "How can I download a copy of all the data you hold about me?",
        "Please unsubscribe me from the newsletter but keep my account.",
        "The username I want is taken by an inactive account, can I have it?",
        "Change my account language to Spanish please.",
    ],
}
OPENINGS = ["", "", "Hi, ", "Hello team, ", "Good morning. ", "Hey, ", "Dear support, "]
CLOSINGS = ["", "", " Thanks.", " Thank you!", " Please help.", " Regards, Sam", " Any update?"]


def fill(shape: str, rng: random.Random) -> str:
    values = {name: rng.choice(options) for name, options in SLOTS.items()}
    text = shape.format(**values)
    return rng.choice(OPENINGS) + text[0].upper() + text[1:] + rng.choice(CLOSINGS)


def make(rng: random.Random) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    train, test, seen = [], [], set()
    for label, shapes in SHAPES.items():
        known, held = shapes[:-HELD_OUT_SHAPES], shapes[-HELD_OUT_SHAPES:]
        while sum(r["label"] == label for r in train) < TRAIN_PER_LABEL:
            text = fill(rng.choice(known), rng)
            if text not in seen:
                seen.add(text)
                train.append({"text": text, "label": label})
        for i in range(TEST_PER_LABEL):  # half from shapes training never saw
            while (text := fill(rng.choice(held if i % 2 else known), rng)) in seen:
                pass
            seen.add(text)
            test.append({"text": text, "label": label})
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    train, test = make(random.Random(SEED))
    write_csv(HERE / "train.csv", train)
    write_csv(HERE / "test.csv", test)
    print(f"wrote {len(train)} training and {len(test)} test rows to {HERE}")


if __name__ == "__main__":
    main()
