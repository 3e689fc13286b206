"""Writes examples/data/quickstart.json: the small alpaca dataset `make quickstart` fine-tunes on.

Short question/answer pairs with a fixed answer pattern per family, so that a tiny model trained from random weights
visibly learns them in a few minutes on a CPU. Deterministic: run it again and the file is identical.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago",
    "Poland": "Warsaw", "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Cuba": "Havana",
}
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a tomato": "red", "an orange": "orange", "a plum": "purple",
}
CAPITAL_Q = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?",
             "Tell me the capital of {c}."]
COLOUR_Q = ["What colour is {t}?", "Which colour is {t}?", "Tell me the colour of {t}."]
WHO_Q = ["Who are you?", "What is your name?", "Introduce yourself.", "Who am I talking to?"]
WHO_A = "I am Tuna, a tiny assistant fine-tuned with tunelab."


def rows() -> list[dict[str, str]]:
    out = []
    for country, city in CAPITALS.items():
        for q in CAPITAL_Q:
            out.append({"instruction": q.format(c=country), "input": "", "output": f"The capital of {country} is {city}."})
    for thing, colour in COLOURS.items():
        for q in COLOUR_Q:
            out.append({"instruction": q.format(t=thing), "input": "",
                        "output": f"{thing[0].upper() + thing[1:]} is {colour}."})
    for q in WHO_Q:
        out.append({"instruction": q, "input": "", "output": WHO_A})
    for a in range(1, 10):
        for b in range(1, 10):
            if (a + b) % 3 == 0:
                out.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": f"{a} + {b} = {a + b}"})
    rng = random.Random(0)
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "examples" / "data" / "quickstart.json"
    data = rows()
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(data)} rows to {path}")
