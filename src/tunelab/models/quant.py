"""Quantized base models through bitsandbytes: QLoRA loading, k-bit training preparation, LoftQ, dequantization.

`model.quantization` loads the frozen base weights of every decoder linear as 4-bit (nf4, fp4) or 8-bit (int8)
bitsandbytes layers; a peft adapter then trains on top (QLoRA). The pieces, in the order a run uses them:

- `bnb_config`: the transformers `BitsAndBytesConfig` that `load.load_model` passes to `from_pretrained`;
- `prepare_for_training`: freeze the base, upcast its small non-quantized parameters to fp32, wire activation
  checkpointing (peft's `prepare_model_for_kbit_training` semantics);
- `loftq_init`: after the adapter is applied, start A and B at the best rank-r fit of the quantization error;
- `dequantize`: before merging, replace every quantized linear by a plain `nn.Linear` holding exactly the weights
  the adapter was trained against, so the merged model is the trained function, and `save_pretrained` writes a
  normal model;
- `describe`: the settings to store next to a saved adapter (its base must be loaded the same way to reproduce it).

All of it works on CPU (bitsandbytes >= 0.45 ships CPU kernels) and on CUDA.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from tunelab.config.schema import ModelConfig
from tunelab.errors import UserError

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

# peft's bitsandbytes adapter wrappers and their plain-Linear counterparts (same module, `.layer` instead of `.bnb`)
_PLAIN_PEFT_CLASS = {"Linear4bit": "Linear", "Linear8bitLt": "Linear", "SVDLinear4bit": "SVDLinear",
                     "SVDLinear8bitLt": "SVDLinear"}


def _bnb(what: str = "model.quantization"):
    """Import bitsandbytes, or say in one line that the optional package is missing."""
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(f"{what}: needs the bitsandbytes package (pip install bitsandbytes)") from None
    return bitsandbytes


def resolve_compute_dtype(name: str, device_type: str | None = None) -> Any:
    """The dtype 4-bit weights are dequantized to and multiplied in.

    auto: bfloat16 on a CUDA GPU that supports it (the QLoRA recipe: half the matmul traffic, fp32 range), else
    float32 — CPUs have no fast half-precision GEMM in torch's default kernels, and fp16's range is too narrow to
    be a safe default. `device_type` defaults to this machine's (cuda when a GPU is visible).
    """
    import torch

    if name != "auto":
        try:
            return getattr(torch, _DTYPE_NAMES[name])
        except KeyError:
            raise UserError(f"model.compute_dtype: unknown dtype {name!r}; use auto, float32, bfloat16 or "
                            "float16") from None
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def bnb_config(model_cfg: ModelConfig, device_type: str | None = None):
    """The `BitsAndBytesConfig` for `model_cfg.quantization`, or None when the base is not quantized.

    4-bit stores weights as packed uint8 pairs (`bnb_4bit_quant_storage`): a float storage dtype only matters to
    FSDP-style sharding that needs one dtype across all parameters, which tunelab's DDP loop does not do, and
    uint8 is the layout every bitsandbytes kernel (CPU and CUDA) and our dequantization read natively.
    """
    if model_cfg.quantization == "none":
        return None
    _bnb()
    import torch
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if model_cfg.quantization not in ("nf4", "fp4"):
        raise UserError(f"model.quantization: unknown value {model_cfg.quantization!r}; use none, nf4, fp4 or "
                        "int8")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.quantization,
        bnb_4bit_use_double_quant=model_cfg.double_quant,
        bnb_4bit_compute_dtype=resolve_compute_dtype(model_cfg.compute_dtype, device_type),
        bnb_4bit_quant_storage=torch.uint8,
    )


def describe(model_cfg: ModelConfig, device_type: str | None = None) -> dict[str, Any] | None:
    """A plain (JSON-ready) dict of the quantization an adapter was trained on, or None for a full-precision base.

    A QLoRA adapter learned the residual of *these* quantized weights; loading its base another way (another
    quant type, no double quantization, another compute dtype) gives a slightly different function, so the
    settings travel with the adapter. `compute_dtype` is resolved (auto becomes what it meant on this machine).
    """
    if model_cfg.quantization == "none":
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        bnb_version = version("bitsandbytes")
    except PackageNotFoundError:
        bnb_version = None
    out: dict[str, Any] = {"method": "bitsandbytes", "quantization": model_cfg.quantization,
                           "bitsandbytes_version": bnb_version}
    if model_cfg.quantization == "int8":
        out["llm_int8_threshold"] = 6.0  # BitsAndBytesConfig's default, which bnb_config keeps
    else:
        compute = resolve_compute_dtype(model_cfg.compute_dtype, device_type)
        out.update(double_quant=bool(model_cfg.double_quant), quant_storage="uint8",
                   compute_dtype=str(compute).removeprefix("torch."))
    return out


def quantized_linear_types() -> tuple[type, ...]:
    """bitsandbytes' quantized linear classes (empty when bitsandbytes is not installed)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ()
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def stored_weight_count(module) -> tuple[int, int] | None:
    """For a quantized linear layer (bitsandbytes, or compressed-tensors as loaded from a `tunelab quantize`
    folder), (the weights it stands for, how many of them are nonzero), whatever its packed storage holds; None for
    any other module (its parameters count as they are). Its weight storage (weight*) is not counted again."""
    types = quantized_linear_types()
    if types and isinstance(module, types):
        n = int(module.in_features) * int(module.out_features)
        try:
            nonzero = int((dequantized_weight(module) != 0).sum())
        except (RuntimeError, ValueError, AttributeError):  # a layout not unpacked here: count every weight
            nonzero = n
        return n, nonzero
    from tunelab.models.compressed import compressed_weight_count

    return compressed_weight_count(module)


def is_quantized(model) -> bool:
    types = quantized_linear_types()
    return bool(types) and any(isinstance(m, types) for m in model.modules())


def keep_training_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns how many layers.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode without grad rewrites the weight in place into a
    packed layout with bf16 block scales (`_convert_weight_packed_for_cpu`) and then multiplies in bf16. That
    (1) changes the model's numbers after the first evaluation (the fp32 scales are rounded to bf16, for good),
    (2) leaves a layout whose forward goes around bitsandbytes' autograd function, so training after an
    evaluation would get no gradient through the layer, and (3) breaks dequantization. Training never takes that
    path, so pinning the standard layout keeps evaluation, training and merging on the same weights.
    """
    n = 0
    types = quantized_linear_types()
    if not types:
        return 0
    for module in model.modules():
        if isinstance(module, types[0]) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def prepare_for_training(model, model_cfg: ModelConfig, gradient_checkpointing: bool):
    """Prepare a quantized base for adapter training (before the adapter is applied); a no-op when unquantized.

    peft's `prepare_model_for_kbit_training` semantics: every base parameter is frozen (the quantized ones cannot
    train at all, and an adapter trains only its own), and the non-quantized ones still in fp16/bf16 (norms,
    embeddings, the output head) are upcast to fp32, because their small updates and the norms' statistics lose
    too much in half precision next to 4-bit weights. peft's own function does the freezing and casting; the
    checkpointing part is tunelab's (non-reentrant, `kernels.enable_activation_checkpointing`), since peft's goes
    through transformers' deprecated reentrant-by-default API. With a frozen embedding, checkpointed blocks would
    see inputs that need no grad, so input grads are enabled too.
    """
    if model_cfg.quantization == "none":
        return model
    from peft import prepare_model_for_kbit_training

    from tunelab.models.kernels import enable_activation_checkpointing

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


# ------------------------------------------------------------------------------------------------- dequantize
def dequantized_weight(module, dtype: Any = None):
    """The weight a bitsandbytes linear multiplies by, as a float tensor [out, in].

    Computed the way the layer's own training forward does it, so the result is bit-for-bit what the adapter saw:
    4-bit: `dequantize_4bit` to the quantization dtype, then cast to the compute dtype; 8-bit: the int8 rows times
    their absmax / 127 (bitsandbytes' `MatMul8bitFp`). `dtype` defaults to the layer's compute dtype (4-bit) or
    float32 (8-bit, whose training matmul runs in the input dtype).
    """
    import torch

    bnb = _bnb("dequantize")
    if isinstance(module, bnb.nn.Linear4bit):
        weight = module.weight
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward (keep_training_layout)
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                                  state)
            state = weight.quant_state
            module.quant_state = state
        w = bnb.functional.dequantize_4bit(weight.data, state)
        target = dtype or getattr(module, "compute_dtype", None) or w.dtype
        return w.to(target)
    if isinstance(module, bnb.nn.Linear8bitLt):
        weight = module.weight
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        cb = weight.data if weight.data.dtype == torch.int8 else module.state.CB
        target = dtype or torch.float32
        return cb.to(target).mul_(scb.to(cb.device).unsqueeze(1).mul(1.0 / 127.0).to(target))
    raise TypeError(f"not a bitsandbytes linear: {type(module).__name__}")


def _plain_linear(module, dtype: Any = None):
    import torch

    w = dequantized_weight(module, dtype)
    new = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if module.bias is not None:
            new.bias.copy_(module.bias.to(w.dtype))
    new.weight.requires_grad_(False)
    if module.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    new.train(module.training)
    return new


def _unwrap_peft_bnb_class(module) -> None:
    """Turn peft's bitsandbytes adapter wrapper into its plain-Linear class (same attributes, same adapter
    weights): the bnb wrappers merge by dequantizing their base weight, which a plain nn.Linear no longer has."""
    import importlib

    cls = type(module)
    mod = cls.__module__
    if not (mod.startswith("peft.tuners.") and mod.endswith(".bnb")):
        return
    plain_name = _PLAIN_PEFT_CLASS.get(cls.__name__)
    layer_module = importlib.import_module(mod[: -len(".bnb")] + ".layer")
    plain = getattr(layer_module, plain_name, None) if plain_name else None
    if plain is None:
        raise UserError(f"dequantize: no plain counterpart for peft's {cls.__module__}.{cls.__name__}; merge the "
                        "adapter onto a dequantized base model instead")
    module.__class__ = plain
    # attributes the plain classes set in __init__ that the bnb ones do not (nn.Linear: no fan-in/fan-out swap)
    if not hasattr(module, "fan_in_fan_out"):
        module.fan_in_fan_out = False
    if not hasattr(module, "is_target_conv_1d_layer"):
        module.is_target_conv_1d_layer = False


def _clear_quantization_attrs(model) -> None:
    """What transformers' `remove_quantization_config` clears, on every transformers model inside `model` (a peft
    wrapper holds one), plus the is_loaded_in_* flags that peft, accelerate and save_pretrained read."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if not isinstance(m, PreTrainedModel):
            continue
        for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
            if attr in vars(m):
                delattr(m, attr)
        for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if attr in vars(m):
                setattr(m, attr, False)
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config


def dequantize(model, dtype: Any = None):
    """Replace every bitsandbytes Linear4bit/Linear8bitLt in `model` (a transformers model, or a peft model around
    one) by a plain `nn.Linear` holding its dequantized weight; returns the model (changed in place).

    Why not reload the original weights: the adapter learned to correct the *quantized* weights, so merging it
    into the originals would add its correction to weights it never saw. Here each weight is exactly what the
    layer's training forward multiplies by (`dequantized_weight`), in the compute dtype by default, so the model
    computes the same function before and after, and a merge lands on the trained function. peft's bnb adapter
    wrappers become their plain classes, so `merge_and_unload` works; the quantization attributes are cleared so
    `save_pretrained` writes a normal full-precision model.
    """
    types = quantized_linear_types()
    if not types:
        return model
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, types)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _plain_linear(module, dtype))
    for module in model.modules():
        _unwrap_peft_bnb_class(module)
    _clear_quantization_attrs(model)
    return model


# ---------------------------------------------------------------------------------------------------- LoftQ
class _CheckpointTensors:
    """Read single tensors from a model folder's safetensors files (one file, or shards with an index)."""

    def __init__(self, folder: str):
        root = Path(folder).expanduser()
        index = root / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.where = {k: root / v for k, v in weight_map.items()}
        else:
            files = sorted(root.glob("*.safetensors"))
            if not files:
                raise UserError(f"adapter.init: loftq needs the base model's original weights as safetensors; "
                                f"none found in {folder}")
            from safetensors import safe_open

            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self.where.update({k: f for k in h.keys()})  # noqa: SIM118 (safe_open has no __iter__)

    def key_for(self, module_name: str) -> str:
        """The checkpoint key of `module_name`'s weight: the longest suffix of its dotted name that is stored (peft
        adds `base_model.model.` in front; some checkpoints store the decoder without its `model.` prefix)."""
        parts = module_name.split(".")
        for i in range(len(parts)):
            key = ".".join(parts[i:]) + ".weight"
            if key in self.where:
                return key
        raise UserError(f"adapter.init: loftq cannot find the original weight of {module_name} in the model "
                        "folder")

    def get(self, key: str):
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as h:
            return h.get_tensor(key)


def loftq_init(peft_model, model_path: str) -> None:
    """LoftQ initialisation of every LoRA layer on a bitsandbytes 4-bit base (in place).

    QLoRA starts from B = 0, so the trained model starts at the quantized function, off the original by the
    quantization error W - D. LoftQ starts A and B at the best rank-r approximation of that error instead: with
    W the original weight (read from `model_path`), D the dequantized base weight and W - D = U S V^T,
    B = U_r sqrt(S_r) / sqrt(s) and A = sqrt(S_r) V_r^T / sqrt(s), so that s·B·A (s: the layer's LoRA scaling) is
    the rank-r truncation and D + s·B·A is the closest the layer can get to W. The base stays as loaded (this is
    the one-step variant, like peft's `replace_lora_weights_loftq`; the iterative one re-quantizes the base).

    Written here rather than taken from peft: peft's LoftQ helpers hard-code device "cuda". This runs on the
    device of each weight, CPU included, with an exact SVD in fp32.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    bnb = _bnb("adapter.init")
    tensors = _CheckpointTensors(model_path)
    done = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters:
            continue
        original = tensors.get(tensors.key_for(name))
        dq = dequantized_weight(base, torch.float32)
        if tuple(original.shape) != tuple(dq.shape):
            raise UserError(f"adapter.init: loftq: {name} has shape {tuple(dq.shape)} but the stored weight has "
                            f"{tuple(original.shape)}")
        residual = original.to(device=dq.device, dtype=torch.float32) - dq
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        for adapter in adapters:
            r = module.r[adapter]
            scaling = module.scaling[adapter]
            root = s[:r].sqrt()
            k = root.numel()  # r may exceed min(in, out): the extra rows/columns stay zero
            b = torch.zeros(residual.shape[0], r, dtype=torch.float32, device=dq.device)
            a = torch.zeros(r, residual.shape[1], dtype=torch.float32, device=dq.device)
            b[:, :k] = u[:, :k] * root / scaling ** 0.5
            a[:k] = root[:, None] * vh[:k] / scaling ** 0.5
            lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            with torch.no_grad():
                lora_a.copy_(a.to(lora_a.dtype))
                lora_b.copy_(b.to(lora_b.dtype))
        done += 1
    if done == 0:
        warnings.warn("loftq_init: no LoRA layer on a 4-bit base; nothing initialised", stacklevel=2)
