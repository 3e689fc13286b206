"""Loading a model (+ optional adapter) and the tokenizer/template it was trained with, for chat and export."""

from __future__ import annotations

from pathlib import Path

from tunelab.config.schema import ModelConfig
from tunelab.errors import UserError


def tokenizer_source(model: str, adapter: str | None) -> str:
    """A training run saves the tokenizer and its chat template next to the adapter; prefer that copy."""
    if adapter and (Path(adapter) / "tokenizer_config.json").exists():
        return adapter
    return model


def load_for_inference(model: str, adapter: str | None = None, *, dtype: str = "auto", merge: bool = False):
    """(model, tokenizer): base weights with the adapter applied (and merged when `merge`)."""
    import torch

    from tunelab.models.load import check_model_path, load_model, load_tokenizer

    check_model_path(model, "--model")
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").exists():
            raise UserError(f"--adapter: {adapter} has no adapter_config.json; is it a PEFT adapter folder?")
    cfg = ModelConfig(path=model, tokenizer=tokenizer_source(model, adapter))
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    tokenizer = load_tokenizer(cfg)
    base = load_model(cfg, dtype=torch_dtype)
    if adapter is not None:
        from peft import PeftModel

        from tunelab.models.adapters import quiet_peft_warnings

        try:
            with quiet_peft_warnings():
                base = PeftModel.from_pretrained(base, adapter)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"--adapter: {adapter} does not fit model {model}: {str(e).splitlines()[0]}") from None
        if merge:
            base = base.merge_and_unload()
    if torch.cuda.is_available():
        base = base.to("cuda")
    base.eval()
    return base, tokenizer
