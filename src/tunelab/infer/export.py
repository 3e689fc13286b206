"""`tunelab export`: merge adapters into their base model and write a standard HF folder.

The folder holds safetensors weights, config.json, the tokenizer with the chat template used in training, and a
generation_config.json whose eos ids include the template's end-of-turn token, so any HF-compatible runtime stops
where tunelab's chat stops.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunelab.errors import UserError


def export_model(*, model: str, adapter: str | list[str] | None, out: Path, dtype: str = "auto",
                 merge_base: str = "trained") -> Path:
    import torch

    from tunelab.data.templates import resolve_template
    from tunelab.infer.loading import load_for_inference

    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise UserError(f"--out: {out} exists and is not an earlier export; choose an empty or new folder")
    if dtype == "auto":
        # keep the base model's stored dtype (fp32 tiny models stay fp32)
        merged, tokenizer = load_for_inference(model, adapter, dtype="float32", merge=True, merge_base=merge_base)
        from transformers import AutoConfig

        stored = getattr(AutoConfig.from_pretrained(model), "dtype", None) or getattr(
            AutoConfig.from_pretrained(model), "torch_dtype", None)
        if isinstance(stored, str):
            stored = getattr(torch, stored, None)
        if isinstance(stored, torch.dtype) and stored != torch.float32:
            merged = merged.to(stored)
    else:
        merged, tokenizer = load_for_inference(model, adapter, dtype=dtype, merge=True, merge_base=merge_base)
    merged = merged.to("cpu")
    template = resolve_template("auto", tokenizer)
    tokenizer.chat_template = template.source
    merged.generation_config.eos_token_id = template.stop_token_ids(tokenizer)
    if tokenizer.pad_token_id is not None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise UserError(f"--out: cannot write {out}: {e.strerror or e}") from None
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
