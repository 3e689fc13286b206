"""`tunelab export`: merge adapters into their base model and write a standard HF folder.

The folder holds safetensors weights, config.json, the tokenizer with the chat template used in training, and a
generation_config.json whose eos ids include the template's end-of-turn token, so any HF-compatible runtime stops
where tunelab's chat stops.

The output folder is the user's: export replaces only the files it writes itself. They are listed in
`tunelab_export.json` (the manifest), so a later export into the same folder replaces exactly those, removes the
ones it no longer writes (say, shards of an earlier export with a different shard count) and leaves everything else
(a README, notes) where it is. The new files are written to a temporary folder beside `--out` first and moved in
only when all of them are complete. `--out` may not be, contain or lie inside a folder the export reads from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from tunelab.errors import UserError
from tunelab.models.record import sparsity_record

MANIFEST = "tunelab_export.json"


def _local(path: str | os.PathLike) -> Path | None:
    """The resolved local folder behind a --model/--adapter/--run value, or None (a hub id)."""
    p = Path(path).expanduser()
    return p.resolve() if p.exists() else None


def _read_manifest(out: Path, shown: Path) -> list[str]:
    """The files an earlier export wrote into `out` (relative names), checked to stay inside `out`."""
    where = shown / MANIFEST
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--out: cannot read {where}: {getattr(e, 'strerror', None) or e}") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise UserError(f"--out: {where} is not an export manifest (no list of files); choose another folder")
    for f in files:
        parts = PurePosixPath(f).parts
        if not parts or PurePosixPath(f).is_absolute() or ".." in parts or f == MANIFEST:
            raise UserError(f"--out: {where} lists {f!r}, which is not a file inside {shown}; choose another folder")
    return files


def check_out(out: Path, inputs: dict[str, list[str]]) -> list[str] | None:
    """Refuse, before anything is loaded, an --out that would overwrite what the export reads (`inputs`: flag ->
    folders) or files the user keeps there. Returns the files of an earlier export in `out` (None: none there)."""
    target = out.expanduser().resolve()
    for flag, paths in inputs.items():
        for path in paths:
            src = _local(path)
            if src is None:
                continue
            # A run folder is read only through its final/ adapter and config.yaml (inputs of their own here), so
            # an export beside them (RUN/exported, as the quickstart writes) replaces nothing it reads.
            inside_ok = flag == "--run"
            if target == src or (src in target.parents and not inside_ok) or target in src.parents:
                relation = "is" if target == src else "is inside" if src in target.parents else "contains"
                raise UserError(f"--out: {out} {relation} the {flag} folder {path}, which the export reads; choose "
                                "a folder outside it")
    if not target.exists():
        return None
    if not target.is_dir():
        raise UserError(f"--out: {out} is a file; choose a new or empty folder")
    if not any(target.iterdir()):
        return None
    if not (target / MANIFEST).is_file():
        raise UserError(f"--out: {out} is not empty and holds no earlier export ({MANIFEST}); choose an empty or new "
                        "folder")
    return _read_manifest(target, out)


def _write_manifest(folder: Path, files: list[str], info: dict) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({**info, "files": sorted(files)}, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)


def _install(staged: Path, target: Path, shown: Path, info: dict) -> None:
    """Move the files written in `staged` into `target`; remove the files only an earlier export there wrote."""
    written = sorted(f.relative_to(staged).as_posix() for f in staged.rglob("*") if f.is_file())
    if not target.exists():
        _write_manifest(staged, written, info)
        staged.rename(target)  # a new folder appears complete or not at all
        return
    old = _read_manifest(target, shown) if (target / MANIFEST).is_file() else []
    clash = [f for f in written if f not in old and os.path.lexists(target / f)]
    if clash:
        raise UserError(f"--out: {shown / clash[0]} was not written by tunelab export and the export would replace "
                        "it; move it away or choose another folder")
    # Until the new manifest is in place, the files of both exports count as the export's: an interrupted install
    # is finished by the next export, and nothing stays behind untracked.
    _write_manifest(target, sorted(set(old) | set(written)), info)
    for f in written:
        (target / f).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / f, target / f)
    for f in sorted(set(old) - set(written)):
        stale = target / f
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
    _write_manifest(target, written, info)


def export_model(*, model: str, adapter: str | list[str] | None, out: Path, dtype: str = "auto",
                 merge_base: str = "trained", run: str | os.PathLike | None = None, allow_pickle: bool = False,
                 trust_remote_code: bool = False, keep_sparsity: bool = False) -> Path:
    """Write the merged model to `out`. `run`: the training folder the model and adapter came from (refused as
    --out like them); `allow_pickle` / `trust_remote_code`: see `load_for_inference`."""

    from tunelab import __version__
    from tunelab.data.templates import resolve_template
    from tunelab.infer.loading import load_for_inference

    out = Path(out)
    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    inputs = {"--model": [model], "--adapter": adapters, "--run": [str(run)] if run is not None else []}
    check_out(out, inputs)
    sparse = sparsity_record(model) if adapters else None
    if sparse is not None and not keep_sparsity:
        raise UserError(f"--adapter: {model} was pruned ({sparse.get('method')}, "
                        f"{100 * float(sparse.get('sparsity') or 0):.0f}% of its decoder weights zero) and merging "
                        "the adapter would fill its zeros; pass --keep-sparsity to re-apply them after merging "
                        "(docs/compression.md), or keep the adapter separate (tunelab chat / eval ppl load it)")
    load = dict(merge=True, merge_base=merge_base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if dtype == "auto":
        # keep the base model's stored dtype (fp32 tiny models stay fp32)
        merged, tokenizer = load_for_inference(model, adapter, dtype="float32", **load)
        merged = to_stored_dtype(merged, model, trust_remote_code=trust_remote_code)
    else:
        merged, tokenizer = load_for_inference(model, adapter, dtype=dtype, **load)
    merged = merged.to("cpu")
    if sparse is not None:
        reapply_zeros(merged, model)
    from tunelab.models.lowrank import densify

    densify(merged)  # a low-rank model (tunelab lowrank): its factors multiplied back, a standard folder
    template = resolve_template("auto", tokenizer)
    tokenizer.chat_template = template.source
    merged.generation_config.eos_token_id = template.stop_token_ids(tokenizer)
    if tokenizer.pad_token_id is not None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    info = {"written_by": f"tunelab {__version__} export", "model": str(model), "adapters": [str(a) for a in adapters]}
    return write_model_folder(merged, tokenizer, out, info)


def reapply_zeros(merged, model: str) -> int:
    """Zero every weight of `merged` that is zero in the same tensor of the pruned folder `model` (a merge that
    keeps the base's sparsity); returns how many merged weights it zeroed."""
    import torch
    from safetensors import safe_open

    params = dict(merged.named_parameters())
    zeroed = 0
    for path in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in params and key.endswith(".weight") and ".layers." in key:
                    base = f.get_tensor(key)
                    p = params[key]
                    if base.shape != p.shape:
                        continue
                    with torch.no_grad():
                        zero = (base == 0).to(p.device)
                        zeroed += int((p.data[zero] != 0).sum())
                        p.data[zero] = 0
    return zeroed


def to_stored_dtype(net, model: str, *, trust_remote_code: bool = False):
    """`net` cast to the dtype the model folder `model` stores its weights in (when not float32)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if isinstance(stored, torch.dtype) and stored != torch.float32:
        return net.to(stored)
    return net


def write_model_folder(model, tokenizer, out: Path, info: dict, extra: dict[str, str] | None = None,
                       save=None) -> Path:
    """Write `model` (save_pretrained, safetensors), `tokenizer` and `extra` files (name -> text) into `out` the
    way export does (`write_folder`). `save(folder)`, when given, writes the weights instead of save_pretrained (a
    format of its own: compressed-tensors). The caller checks `out` first (`check_out`)."""
    from tunelab.utils.env import quiet_transformers

    def fill(staged: Path) -> None:
        with quiet_transformers():
            if save is not None:
                save(staged)
            else:
                model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        for name, text in (extra or {}).items():
            (staged / name).write_text(text)

    return write_folder(out, info, fill)


def write_folder(out: Path, info: dict, fill) -> Path:
    """`fill(folder)` writes the files; they are staged beside `out` and moved in complete (module docstring),
    replacing only files an earlier tunelab write put there (the manifest, which records `info`)."""
    target = Path(out).expanduser().resolve()
    staged = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
        fill(staged)
        _install(staged, target, Path(out), info)
    except OSError as e:
        raise UserError(f"--out: cannot write {out}: {e.strerror or e}") from None
    finally:
        if staged is not None and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return Path(out)
