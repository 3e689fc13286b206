"""Run the standard benchmark: tunelab's batching modes, bare PyTorch and the peers, interleaved, and write RESULTS.md.

Every run is a fresh subprocess (so peak RSS is its own and nothing is cached in memory between systems). Runs are
interleaved, round after round (A B C ... A B C ...), because this kind of machine drifts 30-45 % over minutes:
only numbers taken close together in time compare. Ratios are computed within each round and their median is
reported. Peers run when their virtualenvs exist (benchmarks/peers/setup.sh).

Every system's numbers come from per-step records of cumulative real tokens, positions and seconds, summarised by
the same function (tunelab.engine.bench.summarize_steps) over the steps after warm-up; see benchmarks/README.md.

Usage (from the repository root, in tunelab's virtualenv):
    python benchmarks/run.py [--repeats 3] [--steps 60] [--warmup 3] [--only NAME,...] [--model tiny-7m|tiny-50m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import make_workload  # benchmarks/ is on sys.path when this file runs as a script

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data" / "alpaca_2k.json"
MODEL_ALIASES = {"7m": "tiny-7m", "50m": "tiny-50m"}
REFERENCES = {  # ratio columns of RESULTS.md: column title -> system
    "LLaMA-Factory neat_packing": "llamafactory-neat_packing",
    "TRL padding-free": "trl-padding_free",
    "bare PyTorch": "bare-pytorch",
}

# Runs tunelab's benchmark (the function behind `tunelab bench`) in a fresh interpreter and writes its JSON.
_TUNELAB = """
import json, sys
from tunelab.engine.bench import run_bench
config, out, steps, warmup, peak, *overrides = sys.argv[1:]
result = run_bench(config, overrides, steps=int(steps), warmup=int(warmup), peak_flops=float(peak), echo=True)
open(out, "w").write(json.dumps(result, indent=1))
"""


@dataclass
class System:
    """One benchmarked system: how to launch it for a given model and output file."""

    name: str
    kind: str  # tunelab | bare | llamafactory | trl
    mode: str
    default: bool = True
    notes: str = ""
    overrides: tuple[str, ...] = ()  # tunelab: extra dotted config overrides

    def command(self, args: argparse.Namespace, model: Path, out: Path, peak: float) -> list[str] | None:
        common = ["--model", str(model), "--data", str(DATA), "--steps", str(args.steps), "--warmup",
                  str(args.warmup), "--json", str(out)]
        if self.kind == "tunelab":
            config = HERE / "configs" / f"tunelab_{self.mode}.yaml"
            return [sys.executable, "-c", _TUNELAB, str(config), str(out), str(args.steps), str(args.warmup),
                    str(peak), f"model.path={model}", *self.overrides]
        if self.kind == "bare":
            return [sys.executable, str(HERE / "bare_pytorch.py"), *common]
        python = Path(args.peers) / self.kind / "bin" / "python"
        if not python.exists():
            return None
        return [str(python), str(HERE / "peers" / f"run_{self.kind}.py"), *common, "--mode", self.mode]


SYSTEMS = [
    System("tunelab-none", "tunelab", "none", notes="rows padded to the longest of the micro-batch"),
    System("tunelab-group_by_length", "tunelab", "group_by_length", notes="padded, rows of similar length batched"),
    System("tunelab-padding_free", "tunelab", "padding_free",
           notes="packed rows of <= 512 tokens, attention per packed sequence"),
    System("tunelab-padding_free-compile", "tunelab", "padding_free", default=False, overrides=("model.compile=true",),
           notes="packed rows as above, model.compile: true (its ~35 s compilation is in the warm-up step)"),
    System("bare-pytorch", "bare", "full-rows", notes="8 x 512 rows cut from the token stream, no padding"),
    System("llamafactory-neat_packing", "llamafactory", "neat_packing",
           notes="rows packed into 512-token sequences at preprocessing, block-diagonal masks"),
    System("trl-padding_free", "trl", "padding_free", notes="micro-batch flattened into one row"),
    System("llamafactory-padded", "llamafactory", "padded", default=False, notes="rows padded"),
    System("trl-padded", "trl", "padded", default=False, notes="rows padded"),
]


@dataclass
class Run:
    system: str
    round: int
    ok: bool
    seconds: float
    log: str
    summary: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    error: str = ""


def child_env() -> dict[str, str]:
    """The same environment for every system: offline, no tokenizer threads fighting the training threads."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "DISABLE_VERSION_CHECK": "1",
                "WANDB_DISABLED": "true"})
    return env


def run_one(system: System, rnd: int, cmd: list[str], out: Path, log: Path, timeout: float) -> Run:
    """Launch one run, wait for it, read its JSON (with its own peak RSS) and summarise its records."""
    from tunelab.engine.bench import summarize_steps

    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    run = Run(system.name, rnd, False, seconds, str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log))
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        run.error = f"exit {proc.returncode}: " + " | ".join(tail)
        return run
    data = json.loads(out.read_text(encoding="utf-8"))
    try:
        run.summary = summarize_steps(data["records"], data["warmup"] if "warmup" in data else 0,
                                      rows_per_step=data.get("batch_size"))
    except (KeyError, ValueError) as e:
        run.error = f"bad records: {e}"
        return run
    # the run's own VmHWM when it reports one: wait4's ru_maxrss also counts this runner's RSS (carried over fork
    # and exec), which matters only for runs smaller than the runner
    reported = int(data.get("peak_rss_bytes") or data.get("peak_memory_bytes") or 0)
    run.peak_rss_bytes = reported or rss
    run.versions = data.get("versions", {})
    run.ok = True
    return run


def machine() -> dict[str, Any]:
    import torch
    import transformers

    from tunelab.engine.bench import cpu_name

    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "ram_bytes": ram, "gpu": gpu,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "platform": platform.platform()}


def flops_per_token(model: Path) -> dict[str, dict[str, Any]]:
    """Model FLOPs per real token: the workload's rows (tunelab and peers), and full 512-token rows (bare)."""
    from tunelab.config import load_config
    from tunelab.engine.bench import estimate_flops, train_lengths

    cfg = load_config(HERE / "configs" / "tunelab_none.yaml", [f"model.path={model}"])
    lengths, trained = train_lengths(cfg)
    workload = estimate_flops(cfg, lengths, trained)
    rows = len(lengths)
    return {"workload": workload, "full_rows": estimate_flops(cfg, [512] * rows, 511 / 512)}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def aggregate(runs: list[Run], systems: list[System], flops: dict[str, dict[str, Any]], peak: float
              ) -> list[dict[str, Any]]:
    """Per system: median/min/max tokens/s, per-round ratio medians against the references, and the rest."""
    by_round: dict[tuple[str, int], Run] = {(r.system, r.round): r for r in runs if r.ok}
    rows = []
    for s in systems:
        mine = [r for r in runs if r.system == s.name]
        ok = [r for r in mine if r.ok]
        tps = [r.summary["tokens_per_s"] for r in ok]
        ratios = {}
        for title, ref in REFERENCES.items():
            per_round = [r.summary["tokens_per_s"] / by_round[(ref, r.round)].summary["tokens_per_s"]
                         for r in ok if (ref, r.round) in by_round]
            ratios[title] = _median(per_round)
        fpt = flops["full_rows" if s.kind == "bare" else "workload"]["per_token"]
        med = _median(tps)
        rows.append({
            "system": s.name, "notes": s.notes, "runs": len(mine), "ok": len(ok),
            "tokens_per_s": med, "tokens_per_s_min": min(tps) if tps else None,
            "tokens_per_s_max": max(tps) if tps else None, "ratios": ratios,
            "samples_per_s": _median([r.summary["samples_per_s"] for r in ok]),
            "median_step_s": _median([r.summary["median_step_s"] for r in ok]),
            "padding_ratio": _median([r.summary["padding_ratio"] for r in ok]),
            "peak_rss_bytes": _median([r.peak_rss_bytes for r in ok]),
            "mfu": med * fpt / peak if med is not None and peak > 0 else None,
            "errors": [f"round {r.round}: {r.error}" for r in mine if not r.ok],
            "versions": ok[0].versions if ok else {},
        })
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


KEPT_HEADING = "## Analysis (written by hand, kept across runs)"


def write_markdown(path: Path, info: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace,
                   flops: dict[str, dict[str, Any]], peak: float) -> None:
    m = info["machine"]
    lines = ["# Benchmark results", ""]
    if args.note:
        lines += [f"> {args.note}", ""]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    lines += [
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{m['ram_bytes'] / 2**30:.0f} GiB RAM{gpu}; {m['platform']}",
        f"- tunelab's environment: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}",
    ]
    for r in rows:
        if r["system"].split("-")[0] in ("llamafactory", "trl") and r["versions"]:
            v = r["versions"]
            lines.append(f"- {r['system']}: " + ", ".join(f"{k} {v[k]}" for k in v if k != "python"))
    w = flops["workload"]
    lines += [
        f"- Date: {m['date']}",
        f"- Workload: {info['model']} ({info['model_params'] / 1e6:.2f}M parameters), {info['rows']} alpaca rows "
        "(25-400 tokens), LoRA r 8 / alpha 16 on all linear layers, batch 8, max length 512, fp32, no activation "
        f"checkpointing; {args.warmup} warm-up + {args.steps} measured steps per run, {args.repeats} interleaved "
        f"round{'s' if args.repeats > 1 else ''}, each run a fresh process.",
        f"- Peak FLOP/s for MFU: {peak / 1e9:.1f} GFLOP/s (best fp32 matmul); model FLOPs per real token "
        f"{w['per_token'] / 1e6:.1f} M on the workload, {flops['full_rows']['per_token'] / 1e6:.1f} M on full "
        "512-token rows (bare PyTorch).",
        "",
        "Real tokens/s: median over rounds (min-max). Ratios: the median over rounds of this system's tokens/s over "
        "the reference's in the same round. Peak RSS: the run's whole process (model loading included). "
        "See README.md for how each number is measured.",
        "",
        "| system | real tokens/s | min-max | vs LLaMA-Factory neat_packing | vs TRL padding-free | vs bare PyTorch "
        "| samples/s | median step (s) | padding | peak RSS (MiB) | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratios = [_fmt(r["ratios"][t], ".2f", "x") for t in REFERENCES]
        rss = None if r["peak_rss_bytes"] is None else r["peak_rss_bytes"] / 2**20
        padding = None if r["padding_ratio"] is None else 100 * r["padding_ratio"]
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        spread = (f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}"
                  if r["tokens_per_s_min"] is not None else "–")
        lines.append(
            f"| {r['system']} | {_fmt(r['tokens_per_s'], ',.0f')} | {spread} | {' | '.join(ratios)} | "
            f"{_fmt(r['samples_per_s'], '.2f')} | {_fmt(r['median_step_s'], '.3f')} | {_fmt(padding, '.1f', '%')} | "
            f"{_fmt(rss, ',.0f')} | {_fmt(mfu, '.1f', '%')} |")
    lines += ["", "Systems:", ""]
    lines += [f"- {r['system']}: {r['notes']} ({r['ok']}/{r['runs']} runs ok)" for r in rows]
    errors = [f"- {r['system']} {e}" for r in rows for e in r["errors"]]
    if errors:
        lines += ["", "Failed runs:", "", *errors]
    skipped = info.get("skipped", [])
    if skipped:
        lines += ["", "Not run (no virtualenv; see peers/setup.sh): " + ", ".join(skipped)]
    # a hand-written analysis below KEPT_HEADING in an existing report survives a new run (update it by hand)
    kept = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if KEPT_HEADING in old:
            kept = "\n" + old[old.index(KEPT_HEADING):]
    path.write_text("\n".join(lines) + "\n" + kept, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=60, help="measured steps per run, after warm-up (default 60)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per run, not measured (default 3)")
    p.add_argument("--only", help="comma-separated systems (default: all default systems; see --list)")
    p.add_argument("--model", default="tiny-7m", help="tiny-7m (default) or tiny-50m (aliases 7m, 50m)")
    p.add_argument("--peers", default=os.environ.get("TUNELAB_PEERS",
                                                     str(Path.home() / ".cache" / "tunelab-peers")),
                   help="folder of the peers' virtualenvs (default $TUNELAB_PEERS or ~/.cache/tunelab-peers)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown report (default benchmarks/RESULTS.md)")
    p.add_argument("--json", default=str(HERE / "results.json"), help="raw results (default benchmarks/results.json)")
    p.add_argument("--note", default="", help="a line quoted at the top of the report")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed (default 3600)")
    p.add_argument("--list", action="store_true", help="list the systems and exit")
    args = p.parse_args(argv)

    if args.list:
        for s in SYSTEMS:
            print(f"{s.name:28s} {'default' if s.default else 'on request'}  {s.notes}")
        return 0
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        p.error("--steps, --warmup and --repeats must be >= 1")
    names = {s.name: s for s in SYSTEMS}
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            p.error(f"unknown system {unknown[0]!r}; available: {', '.join(names)}")
        systems = [names[n] for n in wanted]
    else:
        systems = [s for s in SYSTEMS if s.default]
    model_name = MODEL_ALIASES.get(args.model, args.model)
    model = HERE / "models" / model_name
    if model_name not in make_workload.MODELS:
        p.error(f"--model: unknown model {args.model!r}; available: {', '.join(make_workload.MODELS)}")
    if not (model / "config.json").exists() or not DATA.exists():
        make_workload.main([])  # deterministic; keeps what exists

    from tunelab.engine.bench import measure_peak

    peak = measure_peak("float32")
    flops = flops_per_token(model)
    runnable, skipped = [], []
    for s in systems:
        (runnable if s.command(args, model, Path("x"), peak) is not None else skipped).append(s)
    for s in skipped:
        print(f"skip {s.name}: no virtualenv in {args.peers}/{s.kind} (run benchmarks/peers/setup.sh)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = HERE / "logs" / stamp
    work.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    for rnd in range(1, args.repeats + 1):
        for s in runnable:
            out = work / f"{s.name}-r{rnd}.json"
            log = work / f"{s.name}-r{rnd}.log"
            cmd = s.command(args, model, out, peak)
            assert cmd is not None
            print(f"round {rnd}/{args.repeats}: {s.name} ...", end=" ", flush=True)
            run = run_one(s, rnd, cmd, out, log, args.timeout)
            runs.append(run)
            if run.ok:
                print(f"{run.summary['tokens_per_s']:,.0f} tokens/s, peak RSS {run.peak_rss_bytes / 2**20:,.0f} MiB "
                      f"({run.seconds:.0f} s)")
            else:
                print(f"FAILED ({run.error[:300]}); log: {run.log}")

    info = {"machine": machine(), "model": model_name, "model_params": model_params(model),
            "rows": len(json.loads(DATA.read_text(encoding="utf-8"))),
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "peak_flops": peak,
            "flops": flops, "skipped": [s.name for s in skipped], "note": args.note}
    rows = aggregate(runs, runnable, flops, peak)
    Path(args.json).write_text(json.dumps({**info, "systems": rows, "runs": [r.__dict__ for r in runs]}, indent=1)
                               + "\n", encoding="utf-8")
    write_markdown(Path(args.out), info, rows, args, flops, peak)
    print(f"wrote {args.out} and {args.json}; logs in {work}")
    return 0 if all(r.ok for r in runs) else 1


def model_params(model_dir: Path) -> int:
    """Parameter count of a model folder, from a meta-device instance (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    raise SystemExit(main())
