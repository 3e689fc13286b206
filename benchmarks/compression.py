"""Compression on a model that knows something: pretrain a ~50M model on the Python standard library, compress it
every way tunelab can, recover each with a short LoRA, distil a 7M student from it; one table of the results.

    python benchmarks/compression.py                 # ~1.5 h on 2 CPU cores; every stage is cached and resumes
    python benchmarks/compression.py --smoke         # the same pipeline on a tiny model and a few steps (~1 min)
    python benchmarks/compression.py --only table    # rewrite the table from the cached results

Every machine has the corpus: the `.py` files of the running Python's standard library (its own test suites left
out), split by file into training and held-out text (one file in 20 held out, chosen by a hash of its path). A
byte-level BPE tokenizer (8,192 tokens, the tiny models' special tokens and chat template) is trained on the
training files; rows are consecutive lines of one file, up to 500 tokens. Every perplexity is measured by
`tunelab eval ppl` on the same held-out rows (text files the model never saw).

Stages (each writes its folder under --cache and its numbers into results.json, so a killed run continues):
  pretrain   the teacher: hidden 640, 8 layers, 10 heads, MLP 1792 (a multiple of 128, so group-128 quantization
             applies to every layer), untied embeddings; full pt, AdamW, cosine schedule, --pretrain-steps steps
  compress   prune (magnitude / Wanda at 50 % and 2:4, a quarter of the layers dropped), quantize (int8 and int4,
             RTN and GPTQ, per channel and groups of 128), low rank (SVD at half the linear parameters, plain and
             activation-whitened), calibrated on 64 training windows of 256 tokens
  layers     each compressed model's error layer by layer: every decoder linear layer's output on the dense
             model's own inputs to it (held-out windows), relative to the dense layer's output; the mean over layers
  recover    a short LoRA (r 16, all linear layers) on each compressed model; the pruned ones merged with
             --keep-sparsity, so the measured model has the pruned zeros
  kd         a 7M student (hidden 256, 4 layers, MLP 688) from scratch: distilled from the teacher (forward KL with
             the data's cross-entropy) against the same student trained on the data alone, same rows and steps
  qat        int4 group-128: QAT (train.qat) for a few steps from the teacher, against the same steps of plain
             training followed by RTN
  table      benchmarks/RESULTS-compression.md, and the table of docs/compression.md between its markers
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "compression.md"
BEGIN, END = "<!-- compression-benchmark:begin -->", "<!-- compression-benchmark:end -->"

# Sizes and step counts of the real run and of --smoke (the same code on a model that trains in seconds).
FULL = dict(
    vocab=8192, teacher=dict(hidden=640, layers=8, heads=10, intermediate=1792),
    student=dict(hidden=256, layers=4, heads=4, intermediate=688), row_tokens=500, max_files=None,
    eval_rows=160, pretrain_steps=200, pretrain_batch=8, pretrain_lr=1.5e-3, recover_steps=40, recover_batch=4,
    recover_length=256, kd_steps=300, kd_batch=8, kd_length=256, qat_steps=40, qat_batch=4, samples=64, length=256,
    group=128, layer_windows=16,
)
SMOKE = dict(
    vocab=600, teacher=dict(hidden=64, layers=4, heads=4, intermediate=256),
    student=dict(hidden=32, layers=2, heads=2, intermediate=96), row_tokens=120, max_files=40,
    eval_rows=12, pretrain_steps=6, pretrain_batch=4, pretrain_lr=2e-3, recover_steps=2, recover_batch=2,
    recover_length=64, kd_steps=3, kd_batch=2, kd_length=64, qat_steps=2, qat_batch=2, samples=8, length=64,
    group=32, layer_windows=4,
)
STAGES = ("corpus", "pretrain", "compress", "layers", "recover", "kd", "qat", "table")


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------ corpus
def stdlib_files(max_files: int | None) -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
    if max_files:
        files = files[:: max(1, len(files) // max_files)][:max_files]
    return root, files


def held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20 == 0


def build_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE on the training files, with the tiny models' special tokens (ids 0-2) and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.data.templates import BUILTIN_TEMPLATES
    from tunelab.models.tiny import EOS_TOKEN, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   extra_special_tokens=list(SPECIAL_TOKENS[1:]),
                                   chat_template=BUILTIN_TEMPLATES["chatml"].source, model_max_length=2048,
                                   clean_up_tokenization_spaces=False)


def rows_of(text: str, tok, limit: int) -> list[str]:
    """Consecutive lines of one file, as many as fit in `limit` tokens (a longer line alone is cut by max_length)."""
    lines = text.splitlines(keepends=True)
    counts = [len(ids) for ids in tok(lines, add_special_tokens=False)["input_ids"]] if lines else []
    rows, cur, n = [], [], 0
    for line, c in zip(lines, counts):
        if cur and n + c > limit:
            rows.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += c
    if cur:
        rows.append("".join(cur))
    return [r for r in rows if r.strip()]


def stage_corpus(p: dict, cache: Path) -> dict:
    out = cache / "corpus"
    root, files = stdlib_files(p["max_files"])
    texts = {}
    for f in files:
        try:
            texts[str(f.relative_to(root))] = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    train = [t for rel, t in texts.items() if not held_out(rel)]
    held = [t for rel, t in texts.items() if held_out(rel)]
    tok = build_tokenizer(train, p["vocab"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out / "tokenizer")
    counts = {}
    for name, group in (("train", train), ("heldout", held)):
        rows = [r for t in group for r in rows_of(t, tok, p["row_tokens"])]
        if name == "heldout":
            step = max(1, len(rows) // p["eval_rows"])  # evenly over the held-out files
            rows = rows[::step][: p["eval_rows"]]
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({"text": r}) + "\n")
        counts[name] = {"files": len(group), "rows": len(rows),
                        "tokens": sum(len(i) for i in tok([*rows], add_special_tokens=False)["input_ids"])}
    return {"stdlib": str(root), "python": platform.python_version(), "vocab": len(tok), **counts}


def make_model(folder: Path, sizes: dict, vocab: int, tokenizer_dir: Path, seed: int) -> None:
    """A random-init tiny Llama of these sizes (tunelab init-model) with the corpus tokenizer in place of its own."""
    from tunelab.models.tiny import build_tiny_llama

    build_tiny_llama(folder, vocab=vocab, seed=seed, max_position=2048, **sizes)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)


# ------------------------------------------------------------------------------------------------------ steps
def train_config(model: str, data: Path, out: Path, *, adapter: dict, steps: int, batch: int, lr: float,
                 length: int, method: dict | None = None, **train) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(data), "format": "text"}], "max_length": length},
        "adapter": adapter,
        "method": method or {"type": "pt"},
        "train": {"batch_size": batch, "lr": lr, "max_steps": steps, "warmup_ratio": 0.05, "scheduler": "cosine",
                  "log_every": max(1, steps // 20), "save_every": max(1, steps // 5), "save_total_limit": 1,
                  **train},
        "output": {"dir": str(out), "plot": False},
    }


def run_train(cfg: dict) -> dict:
    import tunelab
    from tunelab.engine.metrics import read_metrics

    t0 = time.perf_counter()
    result = tunelab.train(cfg, echo=False)
    losses = [r["loss"] for r in read_metrics(result.output_dir) if "loss" in r]
    return {"final": str(result.final_dir), "seconds": time.perf_counter() - t0, "steps": result.steps,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def measure(model: str, heldout: Path, adapter: str | None = None) -> dict:
    import tunelab

    r = tunelab.evaluate_perplexity(model=str(model), data=str(heldout), adapter=adapter, kind="text",
                                    max_length=512)
    return {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "parameters": r.parameters, "nonzero": r.nonzero,
            "disk_mib": r.disk_bytes / 2 ** 20, "forward_tps": r.forward_tokens_per_s,
            "generate_tps": r.generate_tokens_per_s}


def heldout_windows(heldout: Path, tokenizer_dir: Path, count: int, length: int):
    """The first `count` held-out rows of at least `length` tokens, cut to `length`: a [count, length] id tensor."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = []
    for line in heldout.read_text(encoding="utf-8").splitlines():
        ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == count:
            break
    return torch.tensor(rows)


def layer_error(dense, folder: str, windows) -> dict | None:
    """Mean and worst relative output error ||W'x - Wx|| / ||Wx|| of the decoder's linear layers of `folder` against
    `dense` on the dense model's own inputs x to each layer (summed over `windows`), or None where the compressed
    model lacks a dense layer's name (dropped decoder layers)."""
    import torch

    from tunelab.infer.loading import load_for_inference

    comp, _ = load_for_inference(folder)
    comp.eval()
    mods = dict(comp.named_modules())
    sums: dict[str, list[float]] = {}
    hooks = []

    def hook(name):
        def run(module, args, out):
            d = (mods[name](args[0]) - out).double()
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(d.pow(2).sum())
            acc[1] += float(out.double().pow(2).sum())
        return run

    for name, module in dense.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            if name not in mods:
                return None
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for row in windows:
                dense(input_ids=row[None])
    finally:
        for h in hooks:
            h.remove()
    errors = [(num / den) ** 0.5 for num, den in sums.values() if den > 0]
    return {"mean": sum(errors) / len(errors), "max": max(errors), "linears": len(errors)}


def variants(p: dict) -> list[tuple[str, str, dict]]:
    """(name, command, keyword arguments of tunelab's Python API) for every compression of the table."""
    g = p["group"]
    return [
        ("magnitude 50%", "prune", dict(method="magnitude", sparsity=0.5)),
        ("Wanda 50%", "prune", dict(method="wanda", sparsity=0.5, calibrated=True)),
        ("magnitude 2:4", "prune", dict(method="magnitude", pattern="2:4")),
        ("Wanda 2:4", "prune", dict(method="wanda", pattern="2:4", calibrated=True)),
        ("25% layers dropped", "prune", dict(method="layers", drop=0.25, calibrated=True)),
        ("int8 RTN channel", "quantize", dict(bits=8, granularity="channel")),
        ("int8 GPTQ channel", "quantize", dict(bits=8, granularity="channel", method="gptq", calibrated=True)),
        ("int4 RTN channel", "quantize", dict(bits=4, granularity="channel")),
        ("int4 GPTQ channel", "quantize", dict(bits=4, granularity="channel", method="gptq", calibrated=True)),
        (f"int4 RTN group {g}", "quantize", dict(bits=4, granularity="group", group_size=g)),
        (f"int4 GPTQ group {g}", "quantize", dict(bits=4, granularity="group", group_size=g, method="gptq",
                                                 calibrated=True)),
        ("SVD 50% params", "lowrank", dict(ratio=0.5)),
        ("SVD 50% params, whitened", "lowrank", dict(ratio=0.5, whiten=True, calibrated=True)),
    ]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


class Bench:
    def __init__(self, p: dict, cache: Path):
        self.p, self.cache = p, cache
        self.path = cache / "results.json"
        self.results = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.corpus = cache / "corpus"
        self.heldout = self.corpus / "heldout.jsonl"
        self.train = self.corpus / "train.jsonl"

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.path)

    def once(self, key: str, fn):
        """Run fn() unless its result is recorded; record and save it."""
        if key not in self.results:
            log(f"{key} ...")
            self.results[key] = fn()
            self.save()
            log(f"{key}: {json.dumps(self.results[key])[:300]}")
        return self.results[key]

    # -- stages
    def corpus_stage(self) -> None:
        self.once("corpus", lambda: stage_corpus(self.p, self.cache))

    def pretrain_stage(self) -> None:
        p = self.p
        init = self.cache / "teacher-init"
        if not (init / "config.json").exists():
            make_model(init, p["teacher"], p["vocab"], self.corpus / "tokenizer", seed=0)
        cfg = train_config(init, self.train, self.cache / "teacher-run", adapter={"type": "full"},
                           steps=p["pretrain_steps"], batch=p["pretrain_batch"], lr=p["pretrain_lr"], length=512,
                           weight_decay=0.1, min_lr_ratio=0.1)
        self.once("pretrain", lambda: run_train(cfg))
        self.once("dense", lambda: measure(self.teacher, self.heldout))

    @property
    def teacher(self) -> str:
        return str(self.cache / "teacher-run" / "final")

    def compress_stage(self) -> None:
        import tunelab

        for name, command, kw in variants(self.p):
            kw = dict(kw)
            out = self.cache / "compressed" / slug(name)
            if kw.pop("calibrated", False):
                kw.update(calibration=str(self.train), samples=self.p["samples"], length=self.p["length"])

            def run(command=command, kw=kw, out=out):
                t0 = time.perf_counter()
                getattr(tunelab, command)(model=self.teacher, out=str(out), echo=False, **kw)
                return {"folder": str(out), "seconds": time.perf_counter() - t0, **measure(str(out), self.heldout)}

            self.once(f"compress/{name}", run)

    def layers_stage(self) -> None:
        from tunelab.infer.loading import load_for_inference

        todo = [name for name, _, _ in variants(self.p) if f"layers/{name}" not in self.results]
        if not todo:
            return
        dense, _ = load_for_inference(self.teacher)
        dense.eval()
        windows = heldout_windows(self.heldout, self.corpus / "tokenizer", self.p["layer_windows"], self.p["length"])
        for name in todo:
            folder = self.results[f"compress/{name}"]["folder"]
            self.once(f"layers/{name}", lambda folder=folder: layer_error(dense, folder, windows))

    def recover_stage(self) -> None:
        import tunelab

        p = self.p
        for name, command, _ in variants(p):
            folder = self.results[f"compress/{name}"]["folder"]
            out = self.cache / "recovered" / slug(name)

            def run(command=command, folder=folder, out=out):
                cfg = train_config(folder, self.train, out / "run",
                                   adapter={"type": "lora", "r": 16, "alpha": 32, "target": "all-linear"},
                                   steps=p["recover_steps"], batch=p["recover_batch"], lr=5e-4,
                                   length=p["recover_length"], seed=1)
                trained = run_train(cfg)
                from tunelab.models.record import sparsity_record

                if sparsity_record(folder) is not None:  # zeros in a dense folder: merged with them kept
                    merged = tunelab.export(model=folder, adapter=trained["final"], out=str(out / "merged"),
                                            keep_sparsity=True)
                    return {**trained, "measured": "merged, zeros kept", **measure(str(merged), self.heldout)}
                return {**trained, "measured": "base + adapter", **measure(folder, self.heldout, trained["final"])}

            self.once(f"recover/{name}", run)

    def kd_stage(self) -> None:
        p = self.p
        init = self.cache / "student-init"
        if not (init / "config.json").exists():
            make_model(init, p["student"], p["vocab"], self.corpus / "tokenizer", seed=1)
        common = dict(adapter={"type": "full"}, steps=p["kd_steps"], batch=p["kd_batch"], lr=2e-3,
                      length=p["kd_length"], weight_decay=0.1, seed=2)
        plain = train_config(init, self.train, self.cache / "student-plain", **common)
        kd = train_config(init, self.train, self.cache / "student-kd", **common,
                          method={"type": "kd", "data": "text", "teacher": {"path": self.teacher},
                                  "loss": "forward_kl", "temperature": 1.0, "alpha": 0.5})
        for key, cfg in (("student/plain", plain), ("student/kd", kd)):
            self.once(key, lambda cfg=cfg: (lambda t: {**t, **measure(t["final"], self.heldout)})(run_train(cfg)))

    def qat_stage(self) -> None:
        import tunelab

        p, g = self.p, self.p["group"]
        common = dict(adapter={"type": "full"}, steps=p["qat_steps"], batch=p["qat_batch"], lr=1e-4,
                      length=p["recover_length"], seed=3, scheduler="constant")
        plain = train_config(self.teacher, self.train, self.cache / "qat-plain", **common)
        qat = train_config(self.teacher, self.train, self.cache / "qat-int4", **common, qat="int4",
                           qat_group_size=g)

        def rtn():
            t = run_train(plain)
            out = self.cache / "qat-plain-rtn"
            tunelab.quantize(model=t["final"], out=str(out), bits=4, granularity="group", group_size=g, echo=False)
            return {**t, "dense": measure(t["final"], self.heldout), **measure(str(out), self.heldout)}

        self.once("qat/plain+rtn", rtn)
        self.once("qat/qat", lambda: (lambda t: {**t, **measure(t["final"], self.heldout)})(run_train(qat)))

    # -- report
    def table(self) -> str:
        r, g = self.results, self.p["group"]
        dense = r["dense"]

        def row(name, m, rec=None, layers=None, note=""):
            after = f"{rec['ppl']:.3f}" if rec else "-"
            err = f"{100 * layers['mean']:.2f}%" if layers else "-"
            return (f"| {name} | {m['ppl']:.3f} | {after} | {err} | {m['parameters'] / 1e6:.2f}M | "
                    f"{100 * (1 - m['nonzero'] / m['parameters']):.0f}% | {m['disk_mib']:.1f} | "
                    f"{m['forward_tps']:,.0f} | {m['generate_tps']:,.1f} |{note}")

        lines = ["| model | held-out ppl | after LoRA recovery | layer error | parameters | zeros | MiB on disk | "
                 "forward tok/s | generate tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                 row("dense teacher", dense)]
        for name, _, _ in variants(self.p):
            if f"compress/{name}" in r:
                lines.append(row(name, r[f"compress/{name}"], r.get(f"recover/{name}"), r.get(f"layers/{name}")))
        if "qat/qat" in r:
            lines.append(row(f"int4 group {g}: {self.p['qat_steps']} steps then RTN", r["qat/plain+rtn"]))
            lines.append(row(f"int4 group {g}: {self.p['qat_steps']} steps of QAT", r["qat/qat"]))
        if "student/kd" in r:
            size = r["student/plain"]["parameters"] / 1e6
            lines += ["", f"| {size:.0f}M student, same rows and steps | held-out ppl | parameters | train seconds |",
                      "|---|---:|---:|---:|"]
            for key, label in (("student/plain", "trained on the data alone"),
                               ("student/kd", "distilled from the teacher (forward KL, alpha 0.5)")):
                m = r[key]
                lines.append(f"| {label} | {m['ppl']:.3f} | {m['parameters'] / 1e6:.2f}M | {m['seconds']:.0f} |")
        return "\n".join(lines)

    def header(self) -> str:
        import torch
        import transformers

        c, pre = self.results["corpus"], self.results["pretrain"]
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return (f"Measured {datetime.date.today()} on {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"transformers {transformers.__version__}, Python {c['python']}'s standard library: "
                f"{c['train']['files']} training files ({c['train']['tokens']:,} tokens in {c['train']['rows']:,} "
                f"rows), held-out ppl on {c['heldout']['rows']} rows ({c['heldout']['tokens']:,} tokens) of "
                f"{c['heldout']['files']} other files. Teacher: {self.results['dense']['parameters'] / 1e6:.1f}M "
                f"parameters, {pre['steps']} steps of {self.p['pretrain_batch']} x 512 tokens "
                f"({pre['seconds'] / 60:.0f} min); recovery: LoRA r 16, {self.p['recover_steps']} steps of "
                f"{self.p['recover_batch']} x {self.p['recover_length']} tokens.")

    def write(self, smoke: bool) -> None:
        text = self.header() + "\n\n" + self.table() + "\n"
        out = self.cache / "RESULTS-compression.md" if smoke else HERE / "RESULTS-compression.md"
        out.write_text("# Compression benchmark (benchmarks/compression.py)\n\n" + text)
        (self.cache if smoke else HERE).joinpath("results-compression.json").write_text(
            json.dumps(self.results, indent=1))
        log(f"wrote {out}")
        if not smoke:
            doc = DOC.read_text()
            if BEGIN in doc and END in doc:
                head, rest = doc.split(BEGIN, 1)
                DOC.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])
                log(f"updated the table of {DOC}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model and a few steps: checks the pipeline")
    ap.add_argument("--cache", default=None, help="working folder (default benchmarks/cache/compression[-smoke])")
    ap.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {', '.join(STAGES)}")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="teacher pretraining steps (default 200)")
    args = ap.parse_args(argv)
    p = dict(SMOKE if args.smoke else FULL)
    if args.pretrain_steps:
        p["pretrain_steps"] = args.pretrain_steps
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(STAGES))
    if unknown:
        ap.error(f"--only: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    cache = Path(args.cache) if args.cache else HERE / "cache" / ("compression-smoke" if args.smoke else "compression")
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bench = Bench(p, cache)
    for stage in STAGES:
        if stage in only:
            getattr(bench, f"{stage}_stage" if stage != "table" else "write")(
                *((args.smoke,) if stage == "table" else ()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
