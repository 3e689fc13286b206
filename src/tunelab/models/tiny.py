"""Tiny random Llama models with their own tokenizer, built offline in about a second.

Tests, examples and the quickstart need a real checkpoint folder that loads through the same code as a downloaded
model, without a network. `build_tiny_llama` writes one: a randomly initialised `LlamaForCausalLM`, a byte-level BPE
tokenizer trained here on a synthetic corpus (English-like prose, numbers, code, JSON, some non-Latin text), the
`chatml` chat template and a generation config.

Special tokens (ids fixed: they are the first tokens of the vocabulary):
  0 ``<|endoftext|>``  eos and pad (document separator, as in GPT-2 / Qwen);
  1 ``<|im_start|>``   opens a chat turn;
  2 ``<|im_end|>``     closes a chat turn; generation also stops on it (generation_config.eos_token_id = [2, 0]).
There is no bos token (like Qwen): nothing is prepended to text, and `bos_token_id` in config.json is None.
The tokenizer is byte-level, so any Unicode text encodes and decodes back exactly.

Readers: transformers 5 is the target. For older readers (transformers 4.x, conversion tools) tokenizer_config.json
says `tokenizer_class: PreTrainedTokenizerFast`, lists the chat tokens under `additional_special_tokens` and carries
the chat template inline (besides chat_template.jinja); config.json has `rope_theta` at the top level (besides
`rope_parameters`). Only transformers 5 is tested here.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.data.templates import BUILTIN_TEMPLATES
from tunelab.errors import UserError

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|endoftext|>"
ROPE_THETA = 10000.0
# Characters of synthetic text per vocabulary entry: enough for BPE to fill the vocabulary with frequent merges.
_CHARS_PER_VOCAB_ENTRY = 160


def build_tiny_llama(
    out_dir: str | Path,
    *,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 8000,
    max_position: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random-init Llama model, its tokenizer and chat template to ``out_dir``; return the folder.

    ``intermediate`` defaults to 8/3 of ``hidden`` rounded up to a multiple of 16 (Llama's ratio). The tokenizer
    depends only on ``vocab`` (the corpus is fixed), so models built with different seeds share a tokenizer. The
    tokenizer has exactly ``vocab`` tokens up to about 10,000; a larger ``vocab`` keeps that many embedding rows but
    the tokenizer stops at what the corpus supports.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    if intermediate is None:
        intermediate = 16 * math.ceil(hidden * 8 / 3 / 16)
    _check_sizes(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate, vocab=vocab)

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(vocab, max_length=max_position)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        # The synthetic corpus fills about 10k tokens; beyond that the embedding keeps the requested size and the
        # extra rows are never produced by the tokenizer (as in models whose vocabulary is padded).
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    # Seed a forked RNG so that building a model does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end_id, eos_id], pad_token_id=eos_id, bos_token_id=None
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # save_pretrained draws a progress bar per call; a one-shard tiny model does not need one.
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
    _add_legacy_fields(out, tokenizer.chat_template)
    return out


def build_tiny_tokenizer(vocab: int = 8000, *, max_length: int = 2048) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` with the special tokens and chat template of the tiny models."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_train_bpe(vocab))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=BUILTIN_TEMPLATES["chatml"].source,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


@functools.lru_cache(maxsize=4)
def _train_bpe(vocab: int) -> str:
    """Train the BPE model (deterministic for a given vocab size) and return it serialised; cached per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level pre-tokenization: every byte is a base symbol, so nothing is ever unknown.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets: each token's character span includes its leading space, which keeps offsets contiguous.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(vocab * _CHARS_PER_VOCAB_ENTRY), trainer=trainer)
    return tok.to_str()


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise UserError(f"tiny model: {name} must be positive, got {value}")
    if sizes["hidden"] % sizes["heads"] or (sizes["hidden"] // sizes["heads"]) % 2:
        raise UserError(f"tiny model: hidden ({sizes['hidden']}) must be heads ({sizes['heads']}) x an even head size")
    if sizes["heads"] % sizes["kv_heads"]:
        raise UserError(f"tiny model: heads ({sizes['heads']}) must be a multiple of kv_heads ({sizes['kv_heads']})")
    if sizes["vocab"] < 300:
        raise UserError(f"tiny model: vocab must be at least 300 (256 bytes + special tokens + merges), got {sizes['vocab']}")


def _add_legacy_fields(folder: Path, chat_template: str) -> None:
    """Add the fields older readers look for (see the module docstring); transformers 5 ignores or accepts them."""
    tok_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # transformers 4.x expects a dict under extra_special_tokens; both versions read the older list key.
    extras = tok_cfg.pop("extra_special_tokens", None)
    if isinstance(extras, list):
        tok_cfg["additional_special_tokens"] = extras
    tok_cfg["chat_template"] = chat_template
    tok_cfg["add_bos_token"] = False
    tok_cfg["add_eos_token"] = False
    tok_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", ROPE_THETA))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ synthetic corpus
@functools.lru_cache(maxsize=1)
def _words() -> dict[str, Any]:
    path = resources.files("tunelab") / "resources" / "tiny_corpus_words.json"
    return json.loads(path.read_text(encoding="utf-8"))


def tiny_corpus(n_chars: int, seed: int = 0) -> list[str]:
    """Deterministic synthetic documents, about ``n_chars`` characters in all.

    A mix chosen so that BPE learns a sensible vocabulary for what tests and demos feed it: prose and dialogue,
    numbers, dates and prices, Python/JS/shell/SQL snippets, JSON (tool calls are JSON), markdown and some
    non-Latin text.
    """
    gen = _CorpusGenerator(random.Random(seed), _words())
    kinds = [
        (gen.prose, 34),
        (gen.dialogue, 10),
        (gen.facts, 10),
        (gen.python, 14),
        (gen.other_code, 7),
        (gen.json_doc, 13),
        (gen.markdown, 7),
        (gen.multilingual, 5),
    ]
    makers = [k for k, _ in kinds]
    weights = [w for _, w in kinds]
    docs: list[str] = []
    total = 0
    while total < n_chars:
        doc = gen.rng.choices(makers, weights)[0]()
        docs.append(doc)
        total += len(doc)
    return docs


class _CorpusGenerator:
    """Builds documents of each kind from the word lists."""

    # Syllable parts of made-up words (names of products, places, variables). Real prose has a long tail of rare
    # words that BPE splits into sub-words; a Zipf-weighted pool of invented words gives the corpus that tail, so the
    # vocabulary fills with sub-word merges instead of running out of distinct words.
    _ONSETS = ("", "b", "br", "c", "ch", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl",
               "qu", "r", "s", "sh", "sk", "st", "t", "th", "tr", "v", "w", "z")
    _VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "io", "y")
    _CODAS = ("", "", "", "", "n", "r", "s", "l", "m", "t", "nd", "st", "x", "ck", "ng", "rt", "ld")
    _POOL_SIZE = 6000

    def __init__(self, rng: random.Random, words: dict[str, Any]):
        self.rng = rng
        self.w = words
        pool = {self._invent() for _ in range(self._POOL_SIZE)}
        self.pseudo_pool = sorted(pool)
        rng.shuffle(self.pseudo_pool)
        self.pseudo_cum = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(self.pseudo_pool))))

    def _invent(self) -> str:
        syllables = self.rng.choice((1, 2, 2, 2, 3))
        return "".join(
            self.rng.choice(self._ONSETS) + self.rng.choice(self._VOWELS) + self.rng.choice(self._CODAS)
            for _ in range(syllables)
        )

    def pseudo(self) -> str:
        """A made-up word, frequent ones far more often than rare ones."""
        return self.rng.choices(self.pseudo_pool, cum_weights=self.pseudo_cum)[0]

    # --- small pieces
    def pick(self, key: str) -> str:
        return self.rng.choice(self.w[key])

    def noun(self) -> str:
        return self.pick("nouns")

    def plural(self, noun: str) -> str:
        if noun.endswith(("s", "x", "ch", "sh")):
            return noun + "es"
        if noun.endswith("y") and noun[-2] not in "aeiou":
            return noun[:-1] + "ies"
        return noun + "s"

    def verb(self, form: int) -> str:
        """form 0: base, 1: past, 2: third person singular, 3: -ing."""
        base, past = self.rng.choice(self.w["verbs"])
        if form == 1:
            return past
        if form == 2:
            if base.endswith(("s", "sh", "ch", "x")):
                return base + "es"
            if base.endswith("y") and base[-2] not in "aeiou":
                return base[:-1] + "ies"
            return base + "s"
        if form == 3:
            if base in ("run", "forget"):
                return base + base[-1] + "ing"
            if base.endswith("e") and not base.endswith("ee"):
                return base[:-1] + "ing"
            return base + "ing"
        return base

    def number(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return str(self.rng.randint(0, 20))
        if r < 0.7:
            return str(self.rng.randint(21, 999))
        if r < 0.85:
            return f"{self.rng.randint(1000, 99999):,}"
        return f"{self.rng.uniform(0, 100):.{self.rng.randint(1, 3)}f}"

    def phrase(self) -> str:
        return f"{self.pick('determiners')} {self.pick('adjectives')} {self.noun()}"

    def sentence(self) -> str:
        r = self.rng
        name, name2 = self.pick("names"), self.pick("names")
        forms = [
            lambda: f"{name} {self.verb(1)} {self.phrase()} {self.pick('prepositions')} the {self.noun()}.",
            lambda: f"The {self.noun()} was {self.pick('adjectives')}, {self.pick('connectors')} the {self.noun()} "
            f"{self.verb(1)} {self.pick('adverbs')}.",
            lambda: f"{self.pick('adverbs').capitalize()}, {name} and {name2} {self.verb(1)} {self.number()} "
            f"{self.plural(self.noun())}.",
            lambda: f"Do you think the {self.noun()} will {self.verb(0)} before {self.pick('days')}?",
            lambda: f"We {self.verb(0)} {self.phrase()} every {self.pick('days')} in {self.pick('cities')}.",
            lambda: f"If you {self.verb(0)} the {self.noun()}, it {self.verb(2)} {self.pick('adverbs')}.",
            lambda: f'"I {self.verb(1)} the {self.noun()} {self.pick("adverbs")}," said {name}.',
            lambda: f"Why does {name} keep {self.verb(3)} the {self.pick('adjectives')} {self.noun()}?",
            lambda: f"There are {self.number()} {self.plural(self.noun())} {self.pick('prepositions')} "
            f"the {self.noun()}; {name} {self.verb(1)} {r.randint(2, 9)} of them.",
            lambda: f"{name} is {self.verb(3)} {self.phrase()} for {name2}!",
            lambda: f"Nobody {self.verb(1)} the {self.noun()} ({self.pick('adjectives')}, "
            f"{self.pick('adjectives')} and {self.pick('adjectives')}).",
            lambda: f"{name} {self.verb(1)} the {self.pseudo()} {self.noun()} near {self.pseudo().capitalize()}.",
            lambda: f"The {self.pseudo()} is {self.pick('adjectives')}, {self.pick('connectors')} "
            f"{self.pseudo().capitalize()} {self.verb(2)} {self.pick('adverbs')}.",
            lambda: f"{self.pseudo().capitalize()} and {self.pseudo().capitalize()} {self.verb(1)} "
            f"{self.number()} {self.plural(self.pseudo())} in {self.pick('cities')}.",
        ]
        return r.choice(forms)()

    # --- documents
    def prose(self) -> str:
        paragraphs = []
        for _ in range(self.rng.randint(1, 3)):
            paragraphs.append(" ".join(self.sentence() for _ in range(self.rng.randint(2, 6))))
        return "\n\n".join(paragraphs)

    def dialogue(self) -> str:
        lines = []
        style = self.rng.choice([("User", "Assistant"), ("Q", "A"), (self.pick("names"), self.pick("names"))])
        for _ in range(self.rng.randint(1, 3)):
            question = self.sentence().rstrip(".!?") + "?"
            lines.append(f"{style[0]}: {question}")
            lines.append(f"{style[1]}: {self.sentence()} {self.sentence()}")
        return "\n".join(lines)

    def facts(self) -> str:
        r = self.rng
        a, b = r.randint(0, 999), r.randint(1, 99)
        items = [
            f"On {self.pick('months')} {r.randint(1, 28)}, {r.randint(1950, 2030)}, {self.pick('names')} "
            f"{self.verb(1)} to {self.pick('cities')}.",
            f"It costs ${r.randint(1, 500)}.{r.randint(0, 99):02d} and weighs {self.number()} {self.pick('units')}.",
            f"{a} + {b} = {a + b}; {a} - {b} = {a - b}; {a} * {b} = {a * b}; {a} / {b} = {a / b:.3f}",
            f"Date: {r.randint(1990, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} "
            f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}",
            f"The {self.noun()} grew by {r.randint(1, 99)}% to {self.number()} {self.pick('units')} in "
            f"Q{r.randint(1, 4)} {r.randint(2000, 2030)}.",
            f"Call +{r.randint(1, 99)} {r.randint(100, 999)} {r.randint(1000, 9999)} or write to "
            f"{self.pick('names').lower()}@{self.noun()}.example.org.",
            f"Version {r.randint(0, 9)}.{r.randint(0, 30)}.{r.randint(0, 99)} fixed {r.randint(2, 40)} bugs "
            f"(#{r.randint(100, 9999)}).",
        ]
        return "\n".join(r.sample(items, r.randint(2, 5)))

    def ident(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return self.pick("identifiers")
        if r < 0.65:
            return f"{self.verb(0)}_{self.noun()}"
        if r < 0.8:
            return f"{self.pseudo()}_{self.pick('identifiers')}"
        if r < 0.9:
            return f"{self.pseudo()}{self.pick('identifiers').capitalize()}"
        return f"{self.pick('adjectives')}_{self.pick('identifiers')}"

    def python(self) -> str:
        r = self.rng
        fn, a, b, acc, x = self.ident(), self.ident(), self.ident(), self.ident(), r.choice("ijkxyn")
        body = [
            f"def {fn}({a}, {b}={r.choice(['None', '0', 'True', repr(self.noun())])}):",
            f'    """{self.verb(0).capitalize()} the {self.noun()} and return the {self.pick("adjectives")} '
            f'{self.noun()}."""',
            f"    {acc} = []",
            f"    for {x} in range({r.randint(1, 64)}):",
            f"        if {x} % {r.randint(2, 7)} == 0:",
            f"            {acc}.append({x} * {a})",
            f"        elif {b} is not None:",
            f"            {acc}.append({{'{self.noun()}': {x}, '{self.noun()}': {b}}})",
            f"    return {acc}",
        ]
        extras = [
            f"import {self.rng.choice(['os', 'json', 'math', 're', 'torch', 'numpy as np'])}",
            f"{self.ident()} = [{x} ** 2 for {x} in {a} if {x} > {r.randint(0, 9)}]",
            f'print(f"{{{a}}} {self.plural(self.noun())}: {{len({acc}):>{r.randint(2, 6)}}}")',
            f"class {self.noun().capitalize()}{self.noun().capitalize()}:\n    def __init__(self, {a}):\n"
            f"        self.{a} = {a}\n\n    def __repr__(self):\n        return f\"<{self.noun()} {{self.{a}!r}}>\"",
            f"try:\n    {self.ident()} = {fn}({r.randint(0, 9)})\nexcept (KeyError, ValueError) as e:\n"
            f"    raise RuntimeError(\"{self.sentence()}\") from e",
            f"with open('{self.ident()}.txt', encoding='utf-8') as f:\n    {self.ident()} = f.read().split()",
            f"assert {fn}({r.randint(0, 9)}) == {r.randint(0, 9)}, \"{self.noun()} mismatch\"",
            f"# {self.sentence()}",
        ]
        parts = r.sample(extras, r.randint(1, 3))
        return "\n".join(parts[:1] + [""] + body + [""] + parts[1:])

    def other_code(self) -> str:
        r = self.rng
        a, b = self.ident(), self.ident()
        snippets = [
            f"const {a} = {b}.filter(({self.noun()}) => {self.noun()}.{self.ident()} > {r.randint(0, 99)});\n"
            f"console.log(`${{{a}.length}} {self.plural(self.noun())}`);",
            f"function {a}({b}) {{\n  if (!{b}) {{ return null; }}\n  return {b}.map(x => x * {r.randint(2, 9)});\n}}",
            f"$ mkdir -p {self.noun()}/{self.noun()} && cd {self.noun()}\n$ python -m {a} --{self.noun()} "
            f"{r.randint(1, 512)} --{self.ident().replace('_', '-')}={self.pick('adjectives')}",
            f"SELECT {a}, COUNT(*) AS n FROM {self.plural(self.noun())} WHERE {b} >= {r.randint(0, 100)} "
            f"GROUP BY {a} ORDER BY n DESC LIMIT {r.randint(1, 50)};",
            f"{a}:\n  {b}: {r.randint(0, 999)}\n  {self.ident()}: [{self.noun()}, {self.noun()}]\n"
            f"  {self.ident()}: {r.choice(['true', 'false', 'null'])}",
            f"<div class=\"{self.noun()}\"><p>{self.sentence()}</p></div>",
        ]
        return "\n\n".join(r.sample(snippets, r.randint(1, 3)))

    def json_value(self, depth: int) -> Any:
        r = self.rng
        kind = r.random()
        if depth > 2 or kind < 0.45:
            return r.choice([
                lambda: r.randint(-100, 10000),
                lambda: round(r.uniform(-10, 10), r.randint(1, 4)),
                lambda: self.phrase(),
                lambda: self.pick("names"),
                lambda: r.choice([True, False, None]),
                lambda: self.pick("cities"),
                lambda: f"{self.pseudo()}-{r.randint(1, 999)}",
            ])()
        if kind < 0.7:
            return [self.json_value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.ident(): self.json_value(depth + 1) for _ in range(r.randint(1, 4))}

    def json_doc(self) -> str:
        r = self.rng
        if r.random() < 0.4:
            # Function-calling shapes: schemas and calls.
            params = {
                self.ident(): {"type": r.choice(["string", "integer", "number", "boolean"]), "description": self.phrase()}
                for _ in range(r.randint(1, 3))
            }
            schema = {
                "type": "function",
                "function": {
                    "name": f"{self.verb(0)}_{self.noun()}",
                    "description": self.sentence(),
                    "parameters": {"type": "object", "properties": params, "required": list(params)[:1]},
                },
            }
            call = {"name": schema["function"]["name"], "arguments": {k: self.json_value(3) for k in params}}
            obj: Any = r.choice([schema, call])
        else:
            obj = {self.ident(): self.json_value(1) for _ in range(r.randint(1, 5))}
        return json.dumps(obj, indent=r.choice([None, None, 2, 4]), ensure_ascii=r.random() < 0.5)

    def markdown(self) -> str:
        r = self.rng
        lines = [f"{'#' * r.randint(1, 3)} {self.phrase().capitalize()} of {self.pseudo().capitalize()}", ""]
        for i in range(r.randint(2, 5)):
            bullet = r.choice(["-", "*", f"{i + 1}."])
            lines.append(f"{bullet} **{self.noun()}**: {self.sentence()}")
        if r.random() < 0.5:
            lines += ["", f"| {self.noun()} | {self.noun()} |", "|---|---|"]
            lines += [f"| {self.number()} | {self.pick('adjectives')} |" for _ in range(r.randint(1, 3))]
        return "\n".join(lines)

    def multilingual(self) -> str:
        r = self.rng
        words = [self.pick("foreign") for _ in range(r.randint(2, 6))]
        return f"{self.sentence()} {' '.join(words)} — {self.pick('names')} ({r.randint(1, 99)}°C)."
