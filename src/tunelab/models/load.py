"""Loading base models and tokenizers from local HF folders (or hub ids where a hub is reachable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config.schema import ModelConfig
from tunelab.errors import UserError

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}


def _looks_like_hub_id(path: str) -> bool:
    """`owner/name` that is not a local path: `models/tiny` where a local `models/` folder exists is local."""
    return ("/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1
            and not Path(path).exists() and not Path(path.split("/")[0]).is_dir())


def check_model_path(path: str, what: str = "model.path") -> None:
    """Fail early, with one line, when a local model folder is missing or is not a model."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{what}: {path} is a file; expected a Hugging Face model folder")
        markers = ("config.json", "adapter_config.json", "tunelab_adapter.json", "tokenizer_config.json")
        if not any((p / m).exists() for m in markers):
            raise UserError(f"{what}: {path} has no config.json; is it a Hugging Face model folder?")
        return
    if _looks_like_hub_id(path):
        _check_hub_reachable(path, what)
        return  # transformers reports other hub failures; we translate them in load_* below
    raise UserError(f"{what}: model folder not found: {path}")


def _check_hub_reachable(repo_id: str, what: str) -> None:
    """A hub id that is not in the local cache needs the hub: when its host cannot be reached, say so at once
    instead of letting huggingface_hub retry for half a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except Exception:  # a malformed id: let transformers word the error
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{what}: model folder not found: {repo_id} (not a local folder, and HF_HUB_OFFLINE is set "
                        "so it cannot be fetched from the Hugging Face Hub)")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or 443), timeout=5).close()
    except OSError:
        raise UserError(f"{what}: model folder not found: {repo_id} (not a local folder, and {host} cannot be "
                        "reached to fetch it as a Hugging Face Hub id)") from None


def resolve_dtype(cfg_dtype: str, *, trains_base: bool, device_type: str) -> Any:
    """The storage dtype of the base weights.

    auto: fp32 on CPU (no native half precision there); on CUDA, bf16 for frozen bases (LoRA/freeze keep fp32
    trainable copies) and fp32 master weights for full fine-tuning (autocast does the bf16 compute).
    """
    import torch

    if cfg_dtype != "auto":
        return getattr(torch, _DTYPES[cfg_dtype])
    if device_type == "cuda" and not trains_base and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = cfg.tokenizer or cfg.path
    check_model_path(path, "model.tokenizer" if cfg.tokenizer else "model.path")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except OSError as e:
        raise UserError(f"model.path: cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        # Padding positions are masked from attention and loss, so any id works; eos is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, *, dtype: Any = None, device_map: Any = None, head: str = "lm",
               pad_token_id: int | None = None):
    """Load a causal LM for training or inference; with head="score", the same decoder with a scalar score head
    instead of the LM head (transformers' *ForSequenceClassification, one label): a reward model in the standard
    format that later methods and other tools load with AutoModelForSequenceClassification. A new score head is
    initialised randomly; `pad_token_id` tells it where each right-padded sequence ends.

    With `cfg.quantization` the decoder's linear weights load as bitsandbytes 4-/8-bit layers (models/quant.py);
    `dtype` is then the dtype of everything left unquantized. A quantized model cannot be moved after loading, so
    on CUDA it is placed on this process's current device at load time (accelerate has set it per rank).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunelab.models import quant

    check_model_path(cfg.path)
    kwargs: dict[str, Any] = dict(
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        revision=cfg.revision,
    )
    quant_cfg = quant.bnb_config(cfg)
    if quant_cfg is not None:
        import torch

        kwargs["quantization_config"] = quant_cfg
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if head == "score":
        kwargs["num_labels"] = 1
        if pad_token_id is not None:
            kwargs["pad_token_id"] = pad_token_id
    try:
        if head == "score":
            import transformers

            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # "score.weight newly initialised": expected for a new head
            try:
                model = AutoModelForSequenceClassification.from_pretrained(cfg.path, **kwargs)
            finally:
                transformers.logging.set_verbosity(verbosity)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "flash" in msg.lower() or "attn_implementation" in msg:
            raise UserError(f"model.attn_implementation: {cfg.attn_implementation} is not available here: {msg}") from None
        if quant_cfg is not None and ("bitsandbytes" in msg or "quantiz" in msg.lower()):
            raise UserError(f"model.quantization: cannot load {cfg.path} as {cfg.quantization}: {msg}") from None
        raise UserError(f"model.path: cannot load a model from {cfg.path}: {msg}") from None
    if quant_cfg is not None:
        quant.keep_training_layout(model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (works with frozen inputs and with LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config"):
        model.config.use_cache = False
