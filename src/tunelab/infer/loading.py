"""Loading a model (+ optional adapters) and the tokenizer/template it was trained with, for chat and export.

Several adapters can be loaded at once. peft adapters of the weight-based kinds (LoRA and relatives, IA3, VeRA,
OFT, ...) can then be used one at a time (switch), all together (stacked: their updates add up), merged into the
weights and unmerged again. Prompt-learning adapters and tunelab's own adapters load one at a time.

An adapter trained on a quantized base (QLoRA) records that in tunelab_base.json; the base is rebuilt the same way,
so chat sees exactly the trained model. To merge, the quantized base is dequantized first and the adapter is merged
into those weights (the ones it was trained against); `merge_base="original"` merges into the full-precision
weights of the model folder instead, as most tools do.

As in training, nothing in a model or adapter folder runs as code unless asked for by name: pickle weights need
`allow_pickle` (`--allow-pickle`), code shipped with a checkpoint `trust_remote_code` (`--trust-remote-code`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tunelab.config.schema import ModelConfig
from tunelab.errors import UserError
from tunelab.models.reward_model import tokenizer_source  # noqa: F401  (re-exported for infer's callers)


def adapter_names(adapters: list[str]) -> list[str]:
    """Short unique names for adapter folders (a run's final/ folder is named after its run)."""
    names: list[str] = []
    for a in adapters:
        p = Path(a).resolve()
        name = p.parent.name if p.name in ("final", "weights") else p.name
        base, k = name or "adapter", 2
        while name in names:
            name = f"{base}-{k}"
            k += 1
        names.append(name)
    return names


def _peft_type(folder: str) -> str:
    try:
        return str(json.loads((Path(folder) / "adapter_config.json").read_text()).get("peft_type", ""))
    except (OSError, ValueError):
        return ""


def mergeable_folder(folder: str) -> bool:
    from tunelab.models import tuners
    from tunelab.models.adapters import adapter_folder_kind

    if adapter_folder_kind(folder) == "tunelab":
        kind = json.loads((Path(folder) / "tunelab_adapter.json").read_text()).get("tunelab_adapter", "")
        return tuners.mergeable(kind)
    from tunelab.models.adapters import PROMPT_LEARNING

    return _peft_type(folder) not in PROMPT_LEARNING


def load_for_inference(model: str, adapter: str | list[str] | None = None, *, dtype: str = "auto",
                       merge: bool = False, merge_base: str = "trained", allow_pickle: bool = False,
                       trust_remote_code: bool = False):
    """(model, tokenizer): base weights with the adapters applied (stacked when several; merged when `merge`).
    `allow_pickle` / `trust_remote_code`: the opt-ins of `model.allow_pickle` / `model.trust_remote_code`."""
    import torch

    from tunelab.models import quant, tuners
    from tunelab.models.adapters import (
        PROMPT_LEARNING,
        adapter_folder_kind,
        quiet_peft_warnings,
        read_base_info,
    )
    from tunelab.models.load import (
        CLI_KEYS,
        check_model_path,
        check_weights_format,
        load_model,
        load_tokenizer,
    )
    from tunelab.utils.env import quiet_transformers

    check_model_path(model, "--model")
    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    kinds = []
    for a in adapters:
        kind = adapter_folder_kind(a)
        if kind is None:
            raise UserError(f"--adapter: {a} has no adapter_config.json or tunelab_adapter.json; is it an adapter "
                            "folder?")
        kinds.append(kind)
        # peft falls back to adapter_model.bin (a pickle) when a folder has no safetensors
        check_weights_format(a, allow_pickle=allow_pickle, what="--adapter", opt_in=CLI_KEYS.allow_pickle)
    if len(adapters) > 1 and ("tunelab" in kinds or any(_peft_type(a) in PROMPT_LEARNING for a in adapters)):
        raise UserError("--adapter: prompt-learning and tunelab adapters (bottleneck, bitfit, reft) load one at a "
                        "time; give a single --adapter")
    if merge:
        for a in adapters:
            if not mergeable_folder(a):
                raise UserError(f"--adapter: {a} is a kind of adapter that cannot be merged into the weights; "
                                "use it with `tunelab chat --adapter` instead of exporting a merged model")
    info = read_base_info(adapters)
    qinfo = info.get("quantization") or {}
    if merge and merge_base == "original":
        qinfo = {}
    tok_from = tokenizer_source(model, adapters[0] if adapters else None)
    cfg = ModelConfig(path=model, tokenizer=tok_from, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                      **{k: v for k, v in qinfo.items() if k in ("quantization", "double_quant", "compute_dtype")})
    keys = replace(CLI_KEYS, tokenizer="--adapter" if tok_from != model else "--model")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    tokenizer = load_tokenizer(cfg, keys=keys)
    base = load_model(cfg, dtype=torch_dtype, keys=keys)
    if qinfo and merge:
        base = quant.dequantize(base)  # merge into exactly the weights the adapter was trained against
    if adapters and kinds[0] == "tunelab":
        base = tuners.load_tuner(base, Path(adapters[0]), trainable=False)
        if merge:
            base = tuners.merge_tuner(base)
    elif adapters:
        from peft import PeftModel

        names = adapter_names(adapters)
        try:
            with quiet_peft_warnings(), quiet_transformers():
                base = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
                for a, n in zip(adapters[1:], names[1:]):
                    base.load_adapter(a, adapter_name=n)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"--adapter: {adapters} does not fit model {model}: {str(e).splitlines()[0]}") from None
        if len(names) > 1:
            use_adapters(base, names)
        if merge:
            with quiet_peft_warnings():
                base = base.merge_and_unload(adapter_names=names)
    if torch.cuda.is_available() and not qinfo:
        base = base.to("cuda")
    base.eval()
    return base, tokenizer


def use_adapters(model, names: list[str]) -> None:
    """Activate one adapter (switch) or several at once (stacked) on a peft model holding them."""
    loaded = list(model.peft_config)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise UserError(f"adapter {unknown[0]!r} is not loaded; loaded: {', '.join(loaded)}")
    if len(names) == 1:
        model.set_adapter(names[0])
    else:
        # peft's PeftModel.set_adapter takes one name; the tuner underneath can run several together
        model.base_model.set_adapter(names)
