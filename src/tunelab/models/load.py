"""Loading base models and tokenizers from local HF folders (or hub ids where a hub is reachable).

Nothing a model folder holds runs as code unless the user opted in by name: weights load from safetensors only
(pickle files, `pytorch_model.bin` and `*.pt`, need `model.allow_pickle`), and code shipped with a checkpoint
(config.json `auto_map`) needs `model.trust_remote_code`. Chat and export, which have no config, take the same
opt-ins as flags; `Keys` says which names a message gives.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config.schema import ModelConfig
from tunelab.errors import UserError
from tunelab.models.kernels import enable_activation_checkpointing
from tunelab.utils.hub import looks_like_hub_id, unreachable_host

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}

# Weight files that torch.load unpickles (transformers falls back to them when a folder has no safetensors).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files that make a folder a tokenizer (one of them is enough for AutoTokenizer to try).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")


@dataclass(frozen=True)
class Keys:
    """How messages name the model folder and the opt-ins: config keys in train, flags in chat and export."""

    path: str = "model.path"
    tokenizer: str = "model.tokenizer"
    allow_pickle: str = "set model.allow_pickle=true"
    trust_remote_code: str = "set model.trust_remote_code=true"
    no_tokenizer: str = "set model.tokenizer to a folder that has one (the model it was trained from)"


CONFIG_KEYS = Keys()
CLI_KEYS = Keys(path="--model", tokenizer="--model", allow_pickle="pass --allow-pickle",
                trust_remote_code="pass --trust-remote-code",
                no_tokenizer="copy the tokenizer files of the model it came from into it")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_weights_format(path: str, *, allow_pickle: bool, what: str = "model.path",
                         opt_in: str = CONFIG_KEYS.allow_pickle) -> None:
    """Refuse, in one line, a local folder whose weights are only pickle files unless the user opted in: unpickling
    can run code hidden in the file. Hub ids are held to the same rule by `use_safetensors=True` (see load_model)."""
    p = Path(path).expanduser()
    if allow_pickle or not p.is_dir():
        return
    explicit = None
    try:
        explicit = json.loads((p / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        pass
    if isinstance(explicit, str) and not explicit.endswith((".safetensors", ".safetensors.index.json")):
        # config.json may name the weights file itself; transformers then loads that file whatever else is there
        raise UserError(f"{what}: {path} names pickle weights in config.json (transformers_weights: {explicit}); "
                        f"loading them can run code hidden in the file: {opt_in} only if you trust where the folder "
                        "came from")
    names = sorted(f.name for f in p.iterdir() if f.is_file())
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) or n == "pytorch_model.bin.index.json"]
    if pickles:
        shown = ", ".join(pickles[:3]) + (f" and {len(pickles) - 3} more" if len(pickles) > 3 else "")
        raise UserError(f"{what}: {path} has only pickle weights ({shown}), no safetensors; loading them can run code "
                        f"hidden in the file: convert them to safetensors, or {opt_in} if you trust where the "
                        "folder came from")


def _check_remote_code(path: str, *, trust_remote_code: bool, keys: Keys) -> None:
    """A local folder whose config.json maps its classes to code shipped with it (`auto_map`) and whose model type
    transformers does not know: refuse before anything is loaded, naming the opt-in key."""
    p = Path(path).expanduser()
    if trust_remote_code or not (p / "config.json").is_file():
        return
    try:
        auto_map = json.loads((p / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return  # transformers words a broken config.json
    if not auto_map:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)  # runs nothing: it refuses, or uses its own class
    except ValueError as e:
        if _needs_remote_code(e):
            raise _remote_code_error(path, keys) from None


def _needs_remote_code(e: BaseException) -> bool:
    return "trust_remote_code" in str(e) or "custom code" in str(e)


def _remote_code_error(path: str, keys: Keys) -> UserError:
    return UserError(f"{keys.path}: {path} ships its own model code (auto_map) and loading it runs that code: "
                     f"{keys.trust_remote_code} only if you trust where it came from")


def read_model_config(path: str, *, trust_remote_code: bool = False, revision: str | None = None,
                      keys: Keys = CONFIG_KEYS):
    """transformers' config of a model folder (or hub id), with one-line errors: a folder needing its own code
    names the opt-in key, anything else says config.json could not be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        if _needs_remote_code(e):
            raise _remote_code_error(path, keys) from None
        raise UserError(f"{keys.path}: cannot read config.json of {path}: {_first_line(e)}") from None


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
    if looks_like_hub_id(path):
        _check_hub_reachable(path, what)
        return  # transformers reports other hub failures; we translate them in load_* below
    from tunelab.config.load import path_problem

    problem = path_problem(p)
    if problem not in (None, "not found"):  # a symlink loop or a broken link is not a missing folder
        raise UserError(f"{what}: {path} is {problem}" if problem.startswith("a ") else f"{what}: {path}: {problem}")
    raise UserError(f"{what}: model folder not found: {path}")


def _check_hub_reachable(repo_id: str, what: str) -> None:
    """A hub id that is not in the local cache needs the hub: when its host cannot be reached, say so at once
    instead of letting huggingface_hub retry for half a minute."""
    import os

    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except Exception:  # a malformed id: let transformers word the error
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{what}: model folder not found: {repo_id} (not a local folder, and HF_HUB_OFFLINE is set "
                        "so it cannot be fetched from the Hugging Face Hub)")
    host = unreachable_host()
    if host is not None:
        raise UserError(f"{what}: model folder not found: {repo_id} (not a local folder, and {host} cannot be "
                        "reached to fetch it as a Hugging Face Hub id)")


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


def load_tokenizer(cfg: ModelConfig, *, keys: Keys = CONFIG_KEYS):
    from transformers import AutoTokenizer

    path = cfg.tokenizer or cfg.path
    what = keys.tokenizer if cfg.tokenizer else keys.path
    check_model_path(path, what)
    _check_remote_code(cfg.path, trust_remote_code=cfg.trust_remote_code, keys=keys)
    local = Path(path).expanduser()
    if local.is_dir() and not any((local / n).is_file() for n in TOKENIZER_FILES) \
            and not any(local.glob("*.tiktoken")):
        raise UserError(f"{what}: {path} has no tokenizer (no tokenizer.json or tokenizer_config.json); "
                        f"{keys.no_tokenizer}")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if _needs_remote_code(e):
            raise _remote_code_error(path, keys) from None
        raise UserError(f"{what}: cannot load a tokenizer from {path}: {_first_line(e)}") from None
    if getattr(tok, "deprecation_warnings", None) is not None:
        # "Token indices sequence length is longer than the specified maximum": training truncates to
        # data.max_length itself, and chat's generate warns when a prompt passes the model's positions; marking the
        # warning as already given keeps it out of every command's output.
        tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    if tok.pad_token_id is None:
        # Padding positions are masked from attention and loss, so any id works; eos is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, *, dtype: Any = None, device_map: Any = None, head: str = "lm",
               pad_token_id: int | None = None, keys: Keys = CONFIG_KEYS):
    """Load a causal LM for training or inference; with head="score", the same decoder with a scalar score head
    instead of the LM head (transformers' *ForSequenceClassification, one label): a reward model in the standard
    format that later methods and other tools load with AutoModelForSequenceClassification. A new score head is
    initialised randomly; `pad_token_id` tells it where each right-padded sequence ends.

    With `cfg.quantization` the decoder's linear weights load as bitsandbytes 4-/8-bit layers (models/quant.py);
    `dtype` is then the dtype of everything left unquantized. A quantized model cannot be moved after loading, so
    on CUDA it is placed on this process's current device at load time (accelerate has set it per rank).

    Weights load from safetensors only unless `cfg.allow_pickle` (then safetensors are still preferred, and
    transformers unpickles with torch's weights-only loader).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunelab.models import quant
    from tunelab.utils.env import quiet_transformers

    check_model_path(cfg.path, keys.path)
    _check_remote_code(cfg.path, trust_remote_code=cfg.trust_remote_code, keys=keys)
    check_weights_format(cfg.path, allow_pickle=cfg.allow_pickle, what=keys.path, opt_in=keys.allow_pickle)
    kwargs: dict[str, Any] = dict(
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        revision=cfg.revision,
    )
    if not cfg.allow_pickle:
        kwargs["use_safetensors"] = True  # no torch.load fallback (hub ids too); local folders were checked above
    from tunelab.models.compressed import dequantizing_config
    from tunelab.models.lowrank import LOWRANK_FILE, load_lowrank, lowrank_ranks

    quant_cfg = quant.bnb_config(cfg)
    ranks = lowrank_ranks(cfg.path)  # a `tunelab lowrank` folder (models/lowrank.py)
    if ranks is not None and (quant_cfg is not None or head != "lm"):
        raise UserError(f"{keys.path}: {cfg.path} is a low-rank folder ({LOWRANK_FILE}), which loads as a causal LM "
                        "in full precision only" + (f", not with model.quantization {cfg.quantization}"
                                                    if quant_cfg is not None else ", not with a score head"))
    if quant_cfg is None:
        compressed = dequantizing_config(cfg.path)  # a `tunelab quantize` folder: its weights as they are stored
        if compressed is not None:
            kwargs["quantization_config"] = compressed
    else:
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
    import pickle

    try:
        with quiet_transformers(), warnings.catch_warnings():
            # the quantization_config passed says how to load (dequantize) what the folder's own describes
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            if head == "score":
                import transformers

                verbosity = transformers.logging.get_verbosity()
                transformers.logging.set_verbosity_error()  # "score.weight newly initialised": expected, a new head
                try:
                    model = AutoModelForSequenceClassification.from_pretrained(cfg.path, **kwargs)
                finally:
                    transformers.logging.set_verbosity(verbosity)
            elif ranks is not None:
                model = load_lowrank(cfg.path, ranks, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                     attn_implementation=cfg.attn_implementation, what=keys.path)
            else:
                model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    except pickle.UnpicklingError:
        # only reached with allow_pickle: torch's weights-only unpickler refused something that is not plain tensors
        raise UserError(f"{keys.path}: the pickle weights of {cfg.path} hold more than tensors (possibly code); "
                        "torch's weights-only loader refused them and tunelab does not load them otherwise") from None
    except (OSError, ValueError, ImportError) as e:
        msg = _first_line(e)
        if _needs_remote_code(e):
            raise _remote_code_error(cfg.path, keys) from None
        if "use_safetensors" in msg:  # a hub id with pickle weights only
            raise UserError(f"{keys.path}: {cfg.path} has no safetensors weights, only pickle ones; loading them can "
                            f"run code hidden in the file: {keys.allow_pickle} if you trust where it came from") \
                from None
        if "flash" in msg.lower() or "attn_implementation" in msg:
            raise UserError(f"model.attn_implementation: {cfg.attn_implementation} is not available here: {msg}") from None
        if quant_cfg is not None and ("bitsandbytes" in msg or "quantiz" in msg.lower()):
            raise UserError(f"model.quantization: cannot load {cfg.path} as {cfg.quantization}: {msg}") from None
        raise UserError(f"{keys.path}: cannot load a model from {cfg.path}: {msg}") from None
    if quant_cfg is not None:
        quant.keep_training_layout(model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model
