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
                 trust_remote_code: bool = False) -> Path:
    """Write the merged model to `out`. `run`: the training folder the model and adapter came from (refused as
    --out like them); `allow_pickle` / `trust_remote_code`: see `load_for_inference`."""
    import torch

    from tunelab import __version__
    from tunelab.data.templates import resolve_template
    from tunelab.infer.loading import load_for_inference
    from tunelab.utils.env import quiet_transformers

    out = Path(out)
    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    inputs = {"--model": [model], "--adapter": adapters, "--run": [str(run)] if run is not None else []}
    check_out(out, inputs)
    load = dict(merge=True, merge_base=merge_base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if dtype == "auto":
        # keep the base model's stored dtype (fp32 tiny models stay fp32)
        merged, tokenizer = load_for_inference(model, adapter, dtype="float32", **load)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = getattr(torch, stored, None)
        if isinstance(stored, torch.dtype) and stored != torch.float32:
            merged = merged.to(stored)
    else:
        merged, tokenizer = load_for_inference(model, adapter, dtype=dtype, **load)
    merged = merged.to("cpu")
    template = resolve_template("auto", tokenizer)
    tokenizer.chat_template = template.source
    merged.generation_config.eos_token_id = template.stop_token_ids(tokenizer)
    if tokenizer.pad_token_id is not None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    target = out.expanduser().resolve()
    info = {"written_by": f"tunelab {__version__} export", "model": str(model), "adapters": [str(a) for a in adapters]}
    staged = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
        with quiet_transformers():
            merged.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        _install(staged, target, out, info)
    except OSError as e:
        raise UserError(f"--out: cannot write {out}: {e.strerror or e}") from None
    finally:
        if staged is not None and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return out
