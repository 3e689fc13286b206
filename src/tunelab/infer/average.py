"""`tunelab average`: the mean of several checkpoints of one model (uniform, or an exponential moving average in
the order given), full model folders or adapters alike, written as a folder of the same kind.

Inputs are folders of safetensors with the same tensors (names, shapes, dtypes): model folders (`final/` of a full
or freeze run, an export, a checkpoint's `weights/`), or adapter folders (LoRA and the other PEFT adapters, tunelab's
own). `--run RUN --last K` takes the newest K checkpoints of a run (and they must be whole-tensor checkpoints: a
sharded engine's are exported first; the API resolves them with engine/checkpoint.py). Every floating tensor is averaged in float64 and stored in its own dtype;
integer tensors (position ids, quantized weights) must be equal in every input, since no mean of them means
anything. The other files (config, tokenizer, adapter_config.json) are the newest input's.

Uniform: mean = (1/n) sum x_i. EMA with decay d over x_1..x_n (oldest first): e_1 = x_1, e_i = d e_(i-1) +
(1 - d) x_i: the weight of x_i is (1 - d) d^(n-i), and x_1 keeps d^(n-1).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from tunelab.errors import UserError

WEIGHT_SUFFIX = ".safetensors"


def ema_weights(n: int, decay: float) -> list[float]:
    """The weight of each of n inputs (oldest first) in an EMA of decay `decay` started at the first."""
    return [decay ** (n - 1)] + [(1 - decay) * decay ** (n - 1 - i) for i in range(1, n)]


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(f"*{WEIGHT_SUFFIX}") if p.is_file())


def _kind(folder: Path) -> str:
    if (folder / "adapter_config.json").is_file() or (folder / "tunelab_adapter.json").is_file():
        return "adapter"
    return "model"


def _read(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    files = _weight_files(folder)
    if not files:
        raise UserError(f"average: {folder} holds no safetensors weights; is it a model or adapter folder?")
    try:
        return {f.name: load_file(str(f)) for f in files}
    except Exception as e:  # safetensors raises its own error type
        raise UserError(f"average: {folder}: unreadable weights ({str(e).splitlines()[0]})") from None


def average_states(states: list[dict[str, dict[str, torch.Tensor]]], weights: list[float] | None,
                   names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """sum_i weights[i] x states[i] (weights None: the sum over n, the uniform mean), tensor by tensor, in float64,
    stored in each tensor's dtype; `names` name the inputs in errors."""
    first = states[0]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for file, tensors in first.items():
        out[file] = {}
        for key, t in tensors.items():
            parts = []
            for state, name in zip(states, names):
                other = state.get(file, {}).get(key)
                if other is None:
                    raise UserError(f"average: {name} has no tensor {key} ({file}) that {names[0]} has; the inputs "
                                    "must be checkpoints of the same model and adapter")
                if other.shape != t.shape or other.dtype != t.dtype:
                    raise UserError(f"average: {key} is {tuple(other.shape)} {other.dtype} in {name} but "
                                    f"{tuple(t.shape)} {t.dtype} in {names[0]}")
                parts.append(other)
            if t.is_floating_point():
                acc = torch.zeros(t.shape, dtype=torch.float64)
                for i, p in enumerate(parts):
                    acc += p.double() if weights is None else weights[i] * p.double()
                if weights is None:
                    acc /= len(parts)
                out[file][key] = acc.to(t.dtype).contiguous()
            else:
                for p, name in zip(parts[1:], names[1:]):
                    if not torch.equal(p, t):
                        raise UserError(f"average: the integer tensor {key} differs between {names[0]} and {name} "
                                        "(a quantized model?); average before quantizing")
                out[file][key] = t.contiguous()
        for state, name in zip(states[1:], names[1:]):
            extra = sorted(set(state.get(file, {})) - set(tensors))
            if extra:
                raise UserError(f"average: {name} has a tensor {extra[0]} that {names[0]} lacks")
    for state, name in zip(states[1:], names[1:]):
        extra_files = sorted(set(state) - set(first))
        if extra_files:
            raise UserError(f"average: {name} has a weights file {extra_files[0]} that {names[0]} lacks")
    return out


def _copy_tokenizer(run: Path, dest: Path) -> None:
    """The tokenizer of a run (its final/ folder's, else the one its config names) into `dest`."""
    import yaml
    from transformers import AutoTokenizer

    source = run / "final"
    if not (source / "tokenizer_config.json").is_file():
        try:
            model = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("model", {})
        except (OSError, yaml.YAMLError):
            model = {}
        source = model.get("tokenizer") or model.get("path")
        if not source:
            raise UserError(f"--run: {run} has neither final/ nor a config.yaml naming its model: no tokenizer to "
                            "put beside the averaged weights")
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(dest)


def run_average(*, inputs: list[str], run: str | None = None, ema: float | None = None, out,
                echo: bool = True) -> dict:
    """Average `inputs` (folders, oldest first; with `run`, the weights/ of its checkpoints) into `out` (module
    docstring); `ema`: the decay of an exponential moving average instead of the uniform mean. Returns what was
    done (also written to the folder's tunelab_compression.json)."""
    from safetensors.torch import save_file

    from tunelab import __version__
    from tunelab.infer.export import MANIFEST, check_out, write_folder
    from tunelab.models.record import RECORD, record_text

    folders = [Path(p) for p in inputs]  # with `run`: engine/checkpoint.py's checkpoint_weights chose them
    if len(folders) < 2:
        raise UserError(f"average: needs two or more folders, got {len(folders)}")
    for f in folders:
        if not f.is_dir():
            raise UserError(f"--model: {f} is not a folder")
    if ema is not None and not 0 < ema < 1:
        raise UserError(f"--ema: a decay in (0, 1), got {ema}")
    kinds = {_kind(f) for f in folders}
    if len(kinds) > 1:
        raise UserError("average: the inputs mix model folders and adapter folders; average one kind")
    out = Path(out)
    check_out(out, {"--model": [str(f) for f in folders]} if run is None else {"--run": [run]})
    names = [str(f) for f in folders]
    states = [_read(f) for f in folders]
    weights = ema_weights(len(folders), ema) if ema is not None else [1.0 / len(folders)] * len(folders)
    averaged = average_states(states, weights if ema is not None else None, names)
    newest = folders[-1]
    info = {"method": "ema" if ema is not None else "uniform", "inputs": names, "weights": weights,
            "kind": kinds.pop(), **({"decay": ema} if ema is not None else {})}

    def fill(staged: Path) -> None:
        for item in newest.iterdir():  # the newest input's config, tokenizer, adapter config
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIX) and item.name not in (MANIFEST, RECORD):
                shutil.copy2(item, staged / item.name)
        for file, tensors in averaged.items():
            metadata = {"format": "pt"}
            save_file(tensors, str(staged / file), metadata=metadata)
        (staged / RECORD).write_text(record_text("average", info) + "\n")
        if info["kind"] == "model" and not (staged / "tokenizer_config.json").is_file() and run is not None:
            _copy_tokenizer(Path(run), staged)  # a checkpoint's weights/ hold no tokenizer; the run's final/ does

    write_folder(out, {"written_by": f"tunelab {__version__} average", "inputs": names}, fill)
    if echo:
        print(f"average: {info['method']} of {len(folders)} {info['kind']} folders", file=sys.stderr)
    return info

