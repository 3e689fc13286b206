"""docs/methods.md, generated from the adapter registry, the config schema and benchmarks/methods.json:
`python scripts/methods_doc.py > docs/methods.md` (`make docs`; a test checks the file is current). Repository
tooling, not part of the installed package: it reads benchmarks/ beside it."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.config.load import _type_name, iter_fields
from tunelab.config.schema import ADAPTER_CONFIGS, ModelConfig, TrainConfig
from tunelab.models.adapters import ADAPTERS

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.json"
FAMILIES = {
    "full": "everything trains",
    "selective": "a chosen subset of the model's own parameters trains",
    "additive": "new modules or inputs are added and only they train",
    "reparameterised": "weight updates are expressed through a small set of new parameters",
}
SAVED = {"model": "whole HF model folder", "peft": "peft adapter", "tunelab": "tunelab adapter (safetensors)"}


def _doc(cls) -> str:
    return " ".join((cls.__doc__ or "").split())


def _default(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v) if isinstance(v, str) else str(v)


def _keys_table(cls, prefix: str, only: tuple[str, ...] | None = None) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, hlp in iter_fields(cls, prefix):
        short = key.split(".", 1)[1]
        if short == "type" or (only is not None and short not in only):
            continue
        cell = _type_name(tp).replace("|", "\\|")  # a literal's choices, not table columns
        rows.append(f"| `{key}` | {cell} | `{_default(default)}` | {hlp} |")
    return rows


def _bench_table() -> list[str]:
    if not BENCH.exists():
        return ["No benchmark results yet: run `python benchmarks/methods.py`."]
    data = json.loads(BENCH.read_text())
    meta = data["meta"]
    out = [
        f"One run of `python benchmarks/methods.py` ({meta['date']}, {meta['machine']}): the 7M model on the "
        f"standard alpaca workload (`{meta['config']}`: batch 8, max_length 512, fp32, group_by_length), "
        f"{meta['warmup']} warm-up + {meta['steps']} measured steps, median of {meta['repeats']} round(s). Peak "
        "memory is the process's peak RSS (VmHWM), which includes ~450 MiB of Python/torch runtime. Final loss "
        "is the mean of the last logged window; learning rates differ per method (see benchmarks/methods.py), so "
        "losses compare methods at their usual settings over a short run, not at convergence.",
        "",
        "Reading it: the 7M model is randomly initialised, so every loss starts near ln(vocabulary) ≈ 9.0 and the "
        "final loss shows how far a method moved in a few dozen steps. Its weights are only ~29 MB, so QLoRA's "
        "4-bit base saves less than bitsandbytes' own runtime costs here (QLoRA pays off on real model sizes; "
        "`tunelab plan` shows the split), and 8-bit AdamW keeps fp32 states for tensors under 4,096 elements "
        "(bitsandbytes' rule), which covers most LoRA matrices of this model, so it tracks AdamW closely. "
        "Methods that add work to every layer's forward (DoRA's norm, VeRA's large shared projections, BOFT's "
        "butterfly products) are the slowest on CPU.",
        "",
        "| method | trainable params | peak memory (MiB) | tokens/s | final loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in data["methods"].items():
        if "error" in r:
            out.append(f"| {name} | failed | | | |")
            continue
        out.append(f"| {name} | {r['trainable_params']:,} | {r['peak_memory_mib']:,} | {r['tokens_per_s']:,} | "
                   f"{r['final_loss']:.3f} |")
    return out


def _training_methods() -> list[str]:
    """The `method:` section: what each training method optimises, on which data, and its keys."""
    from tunelab.config.schema import METHOD_CONFIGS
    from tunelab.data.kinds import KINDS
    from tunelab.methods import METHODS

    out = [
        "## Training methods",
        "",
        "`method.type` picks what is optimised; every method runs on the same loop with any `adapter.type` above. "
        "Preference methods score the chosen and rejected answer of each pair in one forward pass (packed "
        "padding-free for dpo, orpo, simpo and cpo when `data.packing` allows), normalise by pairs, and log "
        "rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy, logps/chosen and logps/rejected (kto: "
        "kl, rewards/signed, rewards/accuracy; with eval_ versions on validation data). DPO and KTO need a reference "
        "policy: the model with its adapter disabled or a frozen copy (`method.reference`); DPO can score the "
        "reference once before training (`method.precompute_reference`). Data formats: docs/data.md.",
        "",
        "| `method.type` | data | reference model | what it optimises |",
        "|---|---|---|---|",
    ]
    for name, m in METHODS.items():
        out.append(f"| `{name}` | {KINDS[m.data_kind].describe} | {'yes' if m.models is not None else 'no'} | {m.describe} |")
    out.append("")
    for name, cls in METHOD_CONFIGS.items():
        rows = _keys_table(cls, "method")
        if len(rows) > 2:
            out += [f"### method `{name}`", "", _doc(cls), ""] + rows + [""]
    return out


def markdown() -> str:
    out = [
        "# Fine-tuning methods",
        "",
        "Generated from the adapter registry (`src/tunelab/models/adapters.py`), the config schema and "
        "`benchmarks/methods.json` by `python scripts/methods_doc.py > docs/methods.md`; do not edit by hand.",
        "",
        "Every method is chosen with `adapter.type` and configured in the same `adapter:` section; everything else "
        "(data, loop, checkpoints, exact resume, DDP, chat, export) is the same for all of them. The families:",
        "",
    ]
    out += [f"- **{fam}**: {text}." for fam, text in FAMILIES.items()]
    out += [
        "",
        "| `adapter.type` | family | what trains | merges into the weights | padding-free packing | saved as |",
        "|---|---|---|---|---|---|",
    ]
    for name, kind in ADAPTERS.items():
        out.append(f"| `{name}` | {kind.family} | {kind.trains} | {'yes' if kind.mergeable else 'no'} | "
                   f"{'yes' if kind.packs else 'no (per-row positions)'} | {SAVED[kind.backend]} |")
    out += [
        "",
        "Mergeable adapters export to a plain model folder (`tunelab export`), with logits equal to the unmerged "
        "model (tested for every one, to the float32 reorder bound of docs/architecture.md). The others are "
        "refused by `tunelab export` with a message and are used with `tunelab chat --adapter`. full/freeze save "
        "the whole model. Packing: prompt learning and ReFT need each row's own positions, so "
        "`data.packing: auto` picks `none` for them and `padding_free` is refused.",
        "",
        "## Methods and their keys",
        "",
    ]
    for name, cls in ADAPTER_CONFIGS.items():
        out += [f"### `{name}`", "", _doc(cls), ""]
        rows = _keys_table(cls, "adapter")
        out += rows + [""] if len(rows) > 2 else ["No options.", ""]
    out += [
        "Not provided: UniPELT (gated LoRA + prefix + adapter). peft has no UniPELT and its gates would need a "
        "tunelab-specific combined module that nothing else could load; LoRA, prefix tuning and bottleneck "
        "adapters are each available on their own.",
        "",
    ]
    out += _training_methods()
    out += [
        "## QLoRA: quantized base weights",
        "",
        "Any adapter that leaves the base frozen can train on a base loaded in 4 or 8 bits through bitsandbytes "
        "(its CPU paths work too, so CI tests them). The base is prepared like peft's "
        "`prepare_model_for_kbit_training` (frozen, small non-quantized parameters in fp32, input gradients for "
        "checkpointing). The saved adapter records the quantization in `tunelab_base.json`, so `tunelab chat` "
        "rebuilds the same quantized base. `tunelab export` dequantizes that base and merges into the weights the "
        "adapter was trained against (outputs equal the trained model's); `--merge-base original` merges into the "
        "full-precision weights of the model folder instead, as most tools do. LoftQ (`adapter.init: loftq`) "
        "initialises A and B from the quantization error, so it needs `model.quantization` nf4 or fp4.",
        "",
    ]
    out += _keys_table(ModelConfig, "model", ("quantization", "double_quant", "compute_dtype"))
    out += [
        "",
        "## Optimizers",
        "",
        "`train.optimizer` picks the optimizer for any method; weight-decay groups and LoRA+ learning-rate groups "
        "apply to all of them. `tunelab plan` reports each one's state memory.",
        "",
    ]
    out += _keys_table(TrainConfig, "train", ("optimizer", "momentum", "galore_rank", "galore_gap", "galore_scale",
                                                "galore_target"))
    out += [
        "",
        "## Several adapters",
        "",
        "- Continue training a saved adapter: `adapter.path: runs/a/final` (any adapter type).",
        "- Load several peft weight adapters at once: `tunelab chat --model M --adapter A --adapter B` stacks them "
        "(their updates add up); in the chat, `/adapter A` switches to one, `/adapter A,B` stacks again, "
        "`/adapters` lists them, `/merge` folds the active ones into the weights for faster generation and "
        "`/unmerge` restores them exactly. The Python API offers the same on `ChatSession` (`use`, `merge`, "
        "`unmerge`).",
        "- Export several merged: `tunelab export --model M --adapter A --adapter B --out merged/`.",
        "- Prompt-learning and tunelab adapters (bottleneck, BitFit, ReFT) load one at a time.",
        "",
        "## Benchmark",
        "",
    ]
    out += _bench_table()
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")

