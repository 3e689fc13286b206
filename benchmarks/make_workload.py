"""Build the standard benchmark workload: the tiny models and 2,000 synthetic alpaca rows.

Everything is deterministic (seeded), offline and generated, never committed:

- ``benchmarks/models/tiny-7m``: ``tunelab init-model tiny-llama`` with hidden 256, 4 layers, 4 heads, 8k vocabulary
  (7.26M parameters);
- ``benchmarks/models/tiny-50m``: hidden 640, 8 layers, 10 heads (head size 64), MLP 1712, 8k vocabulary
  (49.7M parameters, untied embeddings);
- ``benchmarks/data/alpaca_2k.json``: 2,000 rows of ten kinds of instructions (summaries, rewrites, explanations,
  arithmetic, code, lists, classification, JSON extraction, stories, reading comprehension), half of them with an
  ``input``. Each row's rendered chat (the models' chatml template: user turn ``instruction\\ninput``, assistant
  turn ``output``) is 25-400 tokens in the tiny tokenizer. Target lengths are drawn log-uniformly, as instruction
  data is: many short rows and a long tail, which is what makes padding cost something.

Usage: python benchmarks/make_workload.py [--rows 2000] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA_FILE = HERE / "data" / "alpaca_2k.json"
MODELS: dict[str, dict[str, int]] = {
    "tiny-7m": {"hidden": 256, "layers": 4, "heads": 4, "vocab": 8000},
    "tiny-50m": {"hidden": 640, "layers": 8, "heads": 10, "intermediate": 1712, "vocab": 8000},
}
MIN_TOKENS, MAX_TOKENS = 25, 400

Row = dict[str, str]


def _words() -> dict[str, Any]:
    """The word lists tunelab's tiny tokenizer was trained on, so the text tokenizes like the model's corpus."""
    text = resources.files("tunelab.resources").joinpath("tiny_corpus_words.json").read_text()
    return json.loads(text)


class Text:
    """Small seeded generators of English-like sentences, numbers and identifiers."""

    def __init__(self, rng: random.Random, words: dict[str, Any]):
        self.rng = rng
        self.w = words

    def pick(self, kind: str) -> Any:
        return self.rng.choice(self.w[kind])

    def noun(self) -> str:
        return self.pick("nouns")

    def verb(self, past: bool = False) -> str:
        return self.pick("verbs")[1 if past else 0]

    def sentence(self) -> str:
        r, p = self.rng, self.pick
        forms: list[Callable[[], str]] = [
            lambda: f"{p('names')} {self.verb(True)} the {p('adjectives')} {self.noun()} {p('prepositions')} "
                    f"the {self.noun()}.",
            lambda: f"In {p('months')}, {p('names')} moved to {p('cities')} {p('connectors')} the {self.noun()} "
                    f"was {p('adjectives')}.",
            lambda: f"Every {p('days')} the {self.noun()} {p('adverbs')} {self.verb(True)} {r.randint(2, 90)} "
                    f"{self.noun()}s.",
            lambda: f"The {p('adjectives')} {self.noun()} near {p('cities')} weighs {r.randint(1, 999)} "
                    f"{p('units')}.",
            lambda: f"{p('names')} and {p('names')} {p('adverbs')} {self.verb(True)} a {self.noun()} "
                    f"{p('connectors')} it was {p('adjectives')}.",
        ]
        return r.choice(forms)()

    def paragraph(self, n: int) -> str:
        return " ".join(self.sentence() for _ in range(n))

    def ident(self) -> str:
        return f"{self.pick('identifiers')}_{self.pick('identifiers')}"


# A task turns (text generator, size n) into one row; the size grows the row by roughly one sentence, line or item.
def _summarize(t: Text, n: int) -> Row:
    sents = [t.sentence() for _ in range(n + 1)]
    return {"instruction": t.rng.choice(["Summarize the following text in a few sentences.",
                                         "Give a short summary of this passage."]),
            "input": " ".join(sents),
            "output": " ".join(sents[i] for i in range(0, len(sents), 3))}


def _rewrite(t: Text, n: int) -> Row:
    text = t.paragraph(n // 2 + 1)
    style = t.rng.choice(["more formal", "simpler", "shorter", "friendlier"])
    return {"instruction": f"Rewrite the following text so that it is {style}.", "input": text,
            "output": text.replace(" the ", " this ").replace(".", ";", 1)}


def _explain(t: Text, n: int) -> Row:
    noun = t.noun()
    return {"instruction": f"Explain why a {t.pick('adjectives')} {noun} matters in {t.pick('cities')}.",
            "input": "",
            "output": f"A {noun} matters for several reasons. " + t.paragraph(n)}


def _arithmetic(t: Text, n: int) -> Row:
    r = t.rng
    items = [(r.randint(2, 250), t.noun()) for _ in range(n + 1)]
    name = t.pick("names")
    question = f"{name} counts " + ", ".join(f"{k} {noun}s" for k, noun in items) + ". How many things in total?"
    steps, total = [], 0
    for k, noun in items:
        steps.append(f"{total} + {k} = {total + k} (adding the {noun}s)")
        total += k
    return {"instruction": f"Solve step by step: {question}", "input": "",
            "output": "\n".join(steps) + f"\nThe answer is {total}."}


def _code(t: Text, n: int) -> Row:
    fn, arg, acc = t.ident(), t.pick("identifiers"), t.pick("identifiers")
    lines = [f"def {fn}({arg}):", f"    {acc} = 0"]
    for i in range(n):
        op = t.rng.choice(["+=", "-=", "*="])
        lines.append(f"    if len({arg}) > {i + t.rng.randint(1, 40)}:")
        lines.append(f"        {acc} {op} {arg}[{i}]")
    lines.append(f"    return {acc}")
    return {"instruction": f"Write a Python function named {fn} that combines the items of {arg}.", "input": "",
            "output": "```python\n" + "\n".join(lines) + "\n```"}


def _listing(t: Text, n: int) -> Row:
    k = n + 1
    adjective = t.pick("adjectives")
    items = [f"{i + 1}. {t.pick('adjectives').capitalize()} {t.noun()}: {t.sentence()}" for i in range(k)]
    return {"instruction": f"List {k} {adjective} ideas for a weekend in {t.pick('cities')}.", "input": "",
            "output": "\n".join(items)}


def _classify(t: Text, n: int) -> Row:
    label = t.rng.choice(["Positive", "Negative", "Neutral"])
    return {"instruction": "Classify the sentiment of this review as Positive, Negative or Neutral.",
            "input": t.paragraph(n + 1), "output": f"{label}."}


def _extract(t: Text, n: int) -> Row:
    people = [(t.pick("names"), t.pick("cities"), t.pick("months")) for _ in range(n + 1)]
    text = " ".join(f"{who} visited {city} in {month} to see the {t.noun()}." for who, city, month in people)
    out = json.dumps([{"name": who, "city": city, "month": month} for who, city, month in people])
    return {"instruction": "Extract every person, city and month from the text as a JSON list.", "input": text,
            "output": out}


def _story(t: Text, n: int) -> Row:
    name, city = t.pick("names"), t.pick("cities")
    return {"instruction": f"Write a short story about {name} in {city}.", "input": "",
            "output": f"{name} arrived in {city} on a {t.pick('days')}. " + t.paragraph(n)}


def _reading(t: Text, n: int) -> Row:
    passage = t.paragraph(n + 1)
    noun = t.noun()
    return {"instruction": "Answer the question using only the passage.",
            "input": f"{passage}\nQuestion: what happened to the {noun}?",
            "output": f"The passage says little about the {noun}; " + t.sentence()}


TASKS: list[Callable[[Text, int], Row]] = [_summarize, _rewrite, _explain, _arithmetic, _code, _listing, _classify,
                                            _extract, _story, _reading]


class Measure:
    """Token length of a row as trained: the chat template rendered with the tiny tokenizer."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir))

    def __call__(self, row: Row) -> int:
        user = "\n".join(part for part in (row["instruction"], row["input"]) if part)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        text = self.tok.apply_chat_template(messages, tokenize=False)
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


def make_row(task: Callable[[Text, int], Row], seed: int, target: int, words: dict[str, Any],
             measure: Measure) -> tuple[Row, int]:
    """The largest size of `task` whose row fits in `target` tokens (at least MIN_TOKENS long)."""

    def build(n: int) -> tuple[Row, int]:
        row = task(Text(random.Random(seed), words), n)
        return row, measure(row)

    best = build(0)
    n = 1
    while True:
        row, length = build(n)
        if length > target:
            break
        best = (row, length)
        n += 1
    if best[1] < MIN_TOKENS:  # too short even at the largest fitting size: take the next one
        best = build(n)
    return best


def make_rows(count: int, seed: int, measure: Measure) -> list[Row]:
    words = _words()
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        target = int(math.exp(rng.uniform(math.log(MIN_TOKENS + 5), math.log(MAX_TOKENS))))
        task = TASKS[i % len(TASKS)]
        row, length = make_row(task, rng.randrange(2**31), target, words, measure)
        if not MIN_TOKENS <= length <= MAX_TOKENS:
            raise RuntimeError(f"row {i} ({task.__name__}) is {length} tokens, outside {MIN_TOKENS}-{MAX_TOKENS}")
        rows.append(row)
    rng.shuffle(rows)
    return rows


def build_models(force: bool) -> None:
    """`tunelab init-model tiny-llama` for each benchmark model (kept when present, unless --force)."""
    for name, sizes in MODELS.items():
        out = HERE / "models" / name
        if (out / "config.json").exists() and not force:
            print(f"model: {out} exists")
            continue
        args = [sys.executable, "-m", "tunelab", "init-model", "tiny-llama", str(out)]
        for key, value in sizes.items():
            args += [f"--{key}", str(value)]
        subprocess.run(args, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild the models and the data even if present")
    args = p.parse_args(argv)
    build_models(args.force)
    if DATA_FILE.exists() and not args.force:
        print(f"data: {DATA_FILE} exists")
        return 0
    measure = Measure(HERE / "models" / "tiny-7m")
    rows = make_rows(args.rows, args.seed, measure)
    lengths = sorted(measure(r) for r in rows)
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    DATA_FILE.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    q = lambda f: lengths[int(f * (len(lengths) - 1))]  # noqa: E731
    print(f"data: {len(rows)} rows written to {DATA_FILE}; tokens per row min {lengths[0]}, p50 {q(0.5)}, "
          f"p90 {q(0.9)}, max {lengths[-1]}, mean {sum(lengths) / len(lengths):.0f}; "
          f"{sum(1 for r in rows if r['input'])} rows with an input")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
