"""Generate the demo data: shop orders written as free sentences, to be turned into fixed JSON.

    python examples/json_extraction/make_data.py      # rewrites train.jsonl and test.jsonl here

Each row is a chat in the `messages` format: a system message naming the schema, the user's
sentence and the JSON answer, e.g.
    "Hi, this is Ana Silva. Please send three desk lamps to Porto."
    -> {"name": "Ana Silva", "item": "desk lamp", "quantity": 3, "city": "Porto"}
The answer is not a copy of the sentence: quantities written as words become numbers, plural
items become the singular catalogue name, and the fields come in any order in the sentence.
A small instruct model writes chatty prose or loose JSON here; a few hundred examples teach it.

The generator is seeded, so the committed files are reproducible byte for byte; test rows never
repeat a training sentence or a training record.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 1234
TRAIN_ROWS = 320
TEST_ROWS = 60
SYSTEM = "Extract the order as JSON with keys name, item, quantity, city."
FIELDS = ("name", "item", "quantity", "city")

FIRST = (
    "Ana Ben Chloe Daniel Emma Farid Grace Hiro Ines Jonas Kofi Lena Mateo Nadia Oscar Priya Quinn "
    "Rosa Samir Tara Umar Vera Wei Yara Zoe Liam Mia Noah Olga Pablo Sofia Tomas Aiko Bruno Carla "
    "Dmitri"
).split()
LAST = (
    "Silva Meyer Okafor Tanaka Rossi Novak Haddad Larsen Kim Garcia Dubois Kowalski Nguyen Schmidt "
    "Patel Costa Ivanova Brown Moreau Ali Jensen Fischer Mendes Sato Wright Lopez Berg Hughes Khan "
    "Weber"
).split()
CITIES = (
    "Porto Lyon Oslo Leeds Graz Turin Kyoto Austin Quebec Krakow Bergen Dublin Seville Munich Denver "
    "Perth Nairobi Lima Malmo Ghent Basel Boston Zagreb Bristol Utrecht Hanoi Cairo Tampa Vienna "
    "Split"
).split()
# (catalogue name, plural): the answer always uses the catalogue (singular) name.
ITEMS = [
    ("desk lamp", "desk lamps"),
    ("coffee mug", "coffee mugs"),
    ("notebook", "notebooks"),
    ("phone charger", "phone chargers"),
    ("yoga mat", "yoga mats"),
    ("water bottle", "water bottles"),
    ("wool scarf", "wool scarves"),
    ("backpack", "backpacks"),
    ("table fan", "table fans"),
    ("box of pencils", "boxes of pencils"),
    ("teapot", "teapots"),
    ("bike helmet", "bike helmets"),
    ("candle", "candles"),
    ("pair of socks", "pairs of socks"),
    ("cutting board", "cutting boards"),
    ("alarm clock", "alarm clocks"),
    ("umbrella", "umbrellas"),
    ("wall clock", "wall clocks"),
    ("sketchbook", "sketchbooks"),
    ("rain jacket", "rain jackets"),
    ("glass jar", "glass jars"),
    ("picture frame", "picture frames"),
    ("laptop stand", "laptop stands"),
    ("doormat", "doormats"),
]
WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
TEMPLATES = [
    "Hi, this is {name}. Please send {qty} {items} to {city}.",
    "{name} from {city} wants {qty} {items}.",
    "Order for {name}: {qty} {items}, deliver to {city}.",
    "Could you ship {qty} {items} to {city}? Thanks, {name}",
    "Deliver {qty} {items} to {name} in {city}.",
    "{city} customer {name} ordered {qty} {items}.",
    "I'd like {qty} {items} sent to {city}. Name: {name}.",
    "Please put {name} down for {qty} {items}, shipping to {city}.",
    "New order from {city}: {name} needs {qty} {items}.",
    "{name} asked for {qty} {items} to be delivered in {city} by Friday.",
    "Ship to {city} please: {qty} {items} for {name}.",
    "Can I get {qty} {items}? I'm {name} and I live in {city}.",
]


def make_row(rng: random.Random) -> tuple[dict, str]:
    """One random order: its chat row and the sentence (the row's identity)."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    item, plural = rng.choice(ITEMS)
    city = rng.choice(CITIES)
    quantity = rng.randint(1, 12) if rng.random() < 0.7 else rng.randint(13, 40)
    # Some quantities are written out as words (only the small ones, as people do).
    qty = WORDS[quantity] if quantity <= 12 and rng.random() < 0.4 else str(quantity)
    items = item if quantity == 1 else plural
    sentence = rng.choice(TEMPLATES).format(name=name, qty=qty, items=items, city=city)
    answer = json.dumps({"name": name, "item": item, "quantity": quantity, "city": city})
    row = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": answer},
        ]
    }
    return row, sentence


def generate(seed: int = SEED, train_rows: int = TRAIN_ROWS, test_rows: int = TEST_ROWS) -> tuple[list, list]:
    """Unique rows, split into train and test with no sentence or record in both."""
    rng = random.Random(seed)
    rows, seen_sentences, seen_records = [], set(), set()
    while len(rows) < train_rows + test_rows:
        row, sentence = make_row(rng)
        record = row["messages"][-1]["content"]
        if sentence in seen_sentences or record in seen_records:
            continue
        seen_sentences.add(sentence)
        seen_records.add(record)
        rows.append(row)
    return rows[:train_rows], rows[train_rows:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    train, test = generate()
    write_jsonl(HERE / "train.jsonl", train)
    write_jsonl(HERE / "test.jsonl", test)
    print(
        f"wrote {len(train)} training rows to {HERE / 'train.jsonl'} and {len(test)} test rows to {HERE / 'test.jsonl'}"
    )


if __name__ == "__main__":
    main()
