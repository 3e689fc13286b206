"""Fine-tuning types: which parameters train, how they are saved, and what the loop must do for them.

`ADAPTERS` maps the names users write (`adapter.type`) to an `AdapterKind`: the function that prepares a model, the
family the method belongs to, what trains, whether it merges into the weights, and whether rows can be packed.
Configs live in `tunelab.config.schema.ADAPTER_CONFIGS` (validated without torch).

Three kinds of implementation sit behind that one dict:
- full and freeze: the model itself trains; saved as a whole HF folder;
- peft methods (LoRA and relatives, AdaLoRA, IA3, LN-tuning, VeRA, OFT, BOFT, prefix/prompt/P-tuning): built with
  peft and saved in its adapter format, so any peft-aware tool loads them;
- tunelab's own small modules where peft has none (bottleneck adapters, BitFit, ReFT; models/tuners/), saved as a
  `tunelab_adapter.json` plus safetensors.

Beyond the forward pass, two methods need the loop: AdaLoRA adds an orthogonality penalty to the loss and
reallocates its rank budget after every backward pass (`AdapterRuntime`), and ReFT needs each row's prompt length
before the forward pass. PiSSA and OLoRA change the base weights when they initialise, so their final adapter is
converted to a plain LoRA on the original base (`save_adapter`).
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config.schema import (
    AdaLoraAdapter,
    AdapterBase,
    BOFTAdapter,
    FreezeAdapter,
    FullAdapter,
    IA3Adapter,
    LNTuningAdapter,
    LoraAdapter,
    OFTAdapter,
    PrefixAdapter,
    PromptAdapter,
    PTuningAdapter,
    VeraAdapter,
)
from tunelab.errors import UserError
from tunelab.models.wrappers import unwrap

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
BASE_INFO = "tunelab_base.json"  # written next to a saved adapter: how the base was loaded (quantization)
TRAINABLE_STATE = "trainable_state.safetensors"  # in checkpoints of prompt-learning adapters (see save_adapter)
INIT_ADAPTER = "adapter_init"
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")  # peft types that add prompts, not weights  # in output.dir: a PiSSA/OLoRA adapter as initialised, for the conversion at save


@dataclass
class ParamCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} / {self.total:,} ({pct:.4f}%)"


@dataclass
class AdapterSetup:
    """What some adapters need from the run while being set up."""

    total_steps: int = 0  # AdaLoRA's budget schedule
    model_path: str = ""  # LoftQ reads the full-precision weights; prompt tuning's text init reads the tokenizer
    tokenizer_path: str = ""
    calibration: Callable[[int], list[dict]] | None = None  # EVA: n -> n collated batches of training rows
    resuming: bool = False  # weights come from a checkpoint next: skip data-dependent initialisation
    output_dir: Path | None = None  # where PiSSA/OLoRA keep their initial adapter


@dataclass(frozen=True)
class AdapterKind:
    apply: Callable[..., Any]  # (model, cfg, setup) -> model
    family: str  # full | selective | additive | reparameterised
    trains: str  # one sentence, for docs/methods.md
    mergeable: bool  # folds into the base weights (export writes a plain model)
    packs: bool = True  # rows may be packed padding-free (not when the method needs per-row positions)
    backend: str = "peft"  # peft | tunelab | model
    # the per-step hooks the loop calls (AdapterRuntime: none); None: the backend's (tunelab's tuners: per-row state)
    runtime_class: Any = None

    @property
    def runtime(self) -> type:
        if self.runtime_class is not None:
            return self.runtime_class
        return _TunelabRuntime if self.backend == "tunelab" else AdapterRuntime

    @property
    def trains_base(self) -> bool:
        """It trains the model's own weights (full, freeze): they need fp32 storage and full-model saves."""
        return self.backend == "model"

    @property
    def disables(self) -> bool:
        """The policy can run with this adapter switched off (peft's disable_adapter): the frozen base for free."""
        return self.backend == "peft"

    @property
    def carries_score_head(self) -> bool:
        """A new score head (method rm) can train and save with it: peft's modules_to_save, or the model itself."""
        return self.backend != "tunelab"


@contextlib.contextmanager
def quiet_peft_warnings():
    """peft reads transformers' deprecated `is_gradient_checkpointing`; its FutureWarning is noise for our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # AdaLoRA adapters saved with pruned ranks: peft warns about its own rank_pattern keys when loading them
        warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
        yield


def count_parameters(model) -> ParamCount:
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return ParamCount(trainable, total)


# ------------------------------------------------------------------------------------------- full and freeze
def _full(model, cfg: FullAdapter, setup: AdapterSetup):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _module_matches(param_name: str, module: str) -> bool:
    """A module matches when its dotted name appears as consecutive components of the parameter name."""
    parts, mparts = param_name.split("."), module.split(".")
    return any(parts[i:i + len(mparts)] == mparts for i in range(len(parts) - len(mparts) + 1))


def _norm_param_names(model) -> set[str]:
    names = set()
    for mname, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            names.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False))
    return names


def _freeze(model, cfg: FreezeAdapter, setup: AdapterSetup):
    names = [n for n, _ in model.named_parameters()]
    indices = sorted({i for i in (layer_index(n) for n in names) if i is not None})
    if cfg.layers > len(indices):
        raise UserError(f"adapter.layers: {cfg.layers} exceeds the model's {len(indices)} decoder layers")
    train_layers = set(indices[len(indices) - cfg.layers:]) if cfg.layers else set()
    extra: set[int] = set()
    if cfg.embeddings:
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                extra.update(id(p) for p in emb.parameters())
    norms = _norm_param_names(model) if cfg.norms else set()
    matched_modules: set[str] = set()
    for name, p in model.named_parameters():
        idx = layer_index(name)
        train = (idx is not None and idx in train_layers) or id(p) in extra or name in norms
        for mod in cfg.modules:
            if _module_matches(name, mod):
                train = True
                matched_modules.add(mod)
        p.requires_grad_(train)
    missing = [m for m in cfg.modules if m not in matched_modules]
    if missing:
        raise UserError(f"adapter.modules: no parameter matches {missing[0]!r} in this model")
    return model


# ------------------------------------------------------------------------------------------------ peft methods
def _target(value: str | list[str]) -> str | list[str] | None:
    if isinstance(value, list) and len(value) == 1 and value[0] in ("all-linear", "auto"):
        value = value[0]
    return None if value == "auto" else value


def _load_peft(model, path: str):
    """A saved peft adapter as the starting point of training.

    Prompt learning is special in peft's format: a saved adapter holds the prompts themselves, not the encoder
    that produced them (P-tuning's MLP/LSTM, prefix tuning's projection), and peft loads it only for inference.
    Prompt tuning and plain prefixes are those prompts, so training continues on them directly; an encoder cannot
    be recovered, so those are refused (a run's checkpoints keep the encoder: resume the run instead)."""
    from peft import PeftModel

    conf_path = Path(path) / "adapter_config.json"
    if not conf_path.exists():
        raise UserError(f"adapter.path: no adapter_config.json in {path}")
    conf = json.loads(conf_path.read_text())
    kind = conf.get("peft_type", "")
    prompt_learning = kind in PROMPT_LEARNING
    if kind == "P_TUNING" or (kind == "PREFIX_TUNING" and conf.get("prefix_projection")):
        raise UserError(f"adapter.path: {path} holds the prompts its encoder produced, not the encoder (peft's "
                        "format), so its training cannot continue; resume the run from a checkpoint instead "
                        "(train.resume)")
    try:
        with quiet_peft_warnings():
            model = PeftModel.from_pretrained(model, path, is_trainable=not prompt_learning)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"adapter.path: {path} does not fit this model: {str(e).splitlines()[0]}") from None
    if prompt_learning:  # loaded in inference mode, where the prompts are used as stored: train them
        for p in model.prompt_encoder.parameters():
            p.requires_grad_(True)
    return model


def _wrap_peft(model, peft_config, key: str = "target"):
    from peft import get_peft_model

    try:
        with quiet_peft_warnings():
            return get_peft_model(model, peft_config)
    except (ValueError, TypeError) as e:
        raise UserError(f"adapter.{key}: {str(e).splitlines()[0]}") from None


def _task(model) -> str:
    """peft's task for this model: a reward model (a *ForSequenceClassification with a score head) is SEQ_CLS, so
    peft trains and saves the new head with the adapter; everything else is a causal LM."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def _on_meta(model) -> bool:
    """Built on the meta device (plan, bench count parameters there): shapes only, no initialisation to run."""
    return any(p.is_meta for p in model.parameters())


def _lora_init(cfg: LoraAdapter, meta: bool) -> Any:
    if cfg.init == "default" or cfg.init == "loftq" or meta:  # LoftQ replaces A and B after the layers exist
        return True
    if cfg.init == "pissa" and cfg.init_iters > 0:
        return f"pissa_niter_{cfg.init_iters}"
    return cfg.init


def _lora(model, cfg: LoraAdapter, setup: AdapterSetup):
    from peft import LoraConfig

    from tunelab.models import fused_lora

    if cfg.path:
        model = _load_peft(model, cfg.path)
        fused_lora.install(model)
        return model
    kwargs: dict[str, Any] = {}
    meta = _on_meta(model)
    if cfg.init == "eva" and not meta:
        from peft import EvaConfig

        # rho=1: every layer keeps rank r, so adapter shapes do not depend on the data (a resumed run rebuilds the
        # same shapes and loads the trained values without recomputing the SVD)
        kwargs["eva_config"] = EvaConfig(rho=1.0)
    lora_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_target(cfg.target),
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
        modules_to_save=cfg.modules_to_save or None,
        init_lora_weights=_lora_init(cfg, meta),
        task_type=_task(model),
        **kwargs,
    )
    model = _wrap_peft(model, lora_cfg)
    if meta:
        pass
    elif cfg.init == "loftq":
        from tunelab.models import quant

        quant.loftq_init(model, setup.model_path)
    elif cfg.init == "eva" and not setup.resuming:
        _eva_init(model, cfg, setup)
    if cfg.init in ("pissa", "olora") and setup.output_dir is not None and not meta:
        # keep the adapter as initialised: the final save subtracts it to express training as a plain LoRA
        init_dir = setup.output_dir / INIT_ADAPTER
        if not (init_dir / "adapter_model.safetensors").exists():
            with quiet_peft_warnings():
                model.save_pretrained(init_dir, safe_serialization=True)
    fused_lora.install(model)  # same function, fewer passes over activations (models/fused_lora.py)
    return model


def _eva_init(model, cfg: LoraAdapter, setup: AdapterSetup) -> None:
    from peft import initialize_lora_eva_weights

    if setup.calibration is None:
        raise UserError("adapter.init: eva needs training data to initialise from")
    batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
               for b in setup.calibration(cfg.init_iters or 4)]
    if not batches:
        raise UserError("adapter.init: eva initialises from the first training batches, which a streamed dataset "
                        "(data.streaming) does not hold up front; use another init")
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    with quiet_peft_warnings(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"adapter.init: eva could not initialise from {len(batches)} batches: "
                            f"{str(e).splitlines()[0]} (raise adapter.init_iters)") from None


def _adalora(model, cfg: AdaLoraAdapter, setup: AdapterSetup):
    from peft import AdaLoraConfig

    if cfg.path:
        return _load_peft(model, cfg.path)
    total = setup.total_steps or 1000  # no run to schedule (plan, bench): any budget gives the same shapes

    def steps(x: float) -> int:
        return int(x) if x >= 1 else int(round(x * total))

    tinit, tfinal = steps(cfg.warmup), steps(cfg.final)
    if tinit + tfinal >= total:
        raise UserError(f"adapter.warmup + adapter.final: {tinit} + {tfinal} steps leave no budget phase in "
                        f"{total} steps; lower them or train longer")
    ada = AdaLoraConfig(
        init_r=cfg.r, target_r=cfg.target_r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=_target(cfg.target), tinit=tinit, tfinal=tfinal, deltaT=cfg.interval,
        beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg, total_step=total, task_type=_task(model),
    )
    return _wrap_peft(model, ada)


def _ia3(model, cfg: IA3Adapter, setup: AdapterSetup):
    from peft import IA3Config

    if cfg.path:
        return _load_peft(model, cfg.path)
    target = _target(cfg.target)
    ff = cfg.feedforward or None
    if target is not None and ff is None:
        ff = []  # explicit targets without feed-forward ones: scale outputs only
    return _wrap_peft(model, IA3Config(target_modules=target, feedforward_modules=ff, task_type=_task(model)))


def _ln(model, cfg: LNTuningAdapter, setup: AdapterSetup):
    from peft import LNTuningConfig

    if cfg.path:
        return _load_peft(model, cfg.path)
    return _wrap_peft(model, LNTuningConfig(target_modules=_target(cfg.target), task_type=_task(model)))


def _vera(model, cfg: VeraAdapter, setup: AdapterSetup):
    from peft import VeraConfig

    if cfg.path:
        return _load_peft(model, cfg.path)
    return _wrap_peft(model, VeraConfig(
        r=cfg.r, target_modules=_target(cfg.target), vera_dropout=cfg.dropout, d_initial=cfg.d_initial,
        projection_prng_key=cfg.projection_seed, save_projection=True, task_type=_task(model)))


def _oft(model, cfg: OFTAdapter, setup: AdapterSetup):
    from peft import OFTConfig

    if cfg.path:
        return _load_peft(model, cfg.path)
    return _wrap_peft(model, OFTConfig(
        r=0, oft_block_size=cfg.block_size, target_modules=_target(cfg.target), module_dropout=cfg.dropout,
        coft=cfg.coft, eps=cfg.eps, task_type=_task(model)), key="block_size")


def _boft(model, cfg: BOFTAdapter, setup: AdapterSetup):
    from peft import BOFTConfig

    if cfg.path:
        return _load_peft(model, cfg.path)
    return _wrap_peft(model, BOFTConfig(
        boft_block_size=cfg.block_size, boft_n_butterfly_factor=cfg.butterfly, target_modules=_target(cfg.target),
        boft_dropout=cfg.dropout, task_type=_task(model)), key="block_size")


def _prefix(model, cfg: PrefixAdapter, setup: AdapterSetup):
    from peft import PrefixTuningConfig

    if cfg.path:
        return _load_peft(model, cfg.path)
    return _wrap_peft(model, PrefixTuningConfig(
        num_virtual_tokens=cfg.virtual_tokens, prefix_projection=cfg.projection,
        encoder_hidden_size=cfg.projection_hidden, task_type=_task(model)), key="virtual_tokens")


def _prompt(model, cfg: PromptAdapter, setup: AdapterSetup):
    from peft import PromptTuningConfig, PromptTuningInit

    if cfg.path:
        return _load_peft(model, cfg.path)
    kwargs: dict[str, Any] = {"prompt_tuning_init": PromptTuningInit.RANDOM}
    if cfg.init_text:
        kwargs = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": cfg.init_text,
                  "tokenizer_name_or_path": setup.tokenizer_path or setup.model_path}
    return _wrap_peft(model, PromptTuningConfig(num_virtual_tokens=cfg.virtual_tokens, task_type=_task(model),
                                                **kwargs), key="virtual_tokens")


def _ptuning(model, cfg: PTuningAdapter, setup: AdapterSetup):
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType

    if cfg.path:
        return _load_peft(model, cfg.path)
    kind = PromptEncoderReparameterizationType.MLP if cfg.encoder == "mlp" else PromptEncoderReparameterizationType.LSTM
    return _wrap_peft(model, PromptEncoderConfig(
        num_virtual_tokens=cfg.virtual_tokens, encoder_reparameterization_type=kind,
        encoder_hidden_size=cfg.encoder_hidden, encoder_dropout=cfg.dropout, task_type=_task(model)),
        key="virtual_tokens")


def _tuner(model, cfg: AdapterBase, setup: AdapterSetup):
    from tunelab.models import tuners

    return tuners.apply_tuner(model, cfg)


# ------------------------------------------------------------------------------------- training-time hooks
class AdapterRuntime:
    """What the loop does for the adapter around each step; this base does nothing, which is what most adapters
    need. An adapter kind with per-step behaviour names its subclass in `AdapterKind.runtime` (module docstring);
    the loop only ever calls `AdapterRuntime.for_model` and these five hooks."""

    @classmethod
    def for_model(cls, model, cfg: AdapterBase) -> AdapterRuntime:
        """The runtime of `cfg.type`'s adapter, bound to `model` (the unwrapped, adapter-carrying model)."""
        return ADAPTERS[cfg.type].runtime(unwrap(model))

    def __init__(self, model=None):
        pass

    def before_forward(self, model, batch: dict) -> None:
        """Before each micro-batch's forward pass."""

    def extra_loss(self, model):
        """A term added to the step's loss once (on the micro-batch that synchronises gradients), or None."""
        return None

    def after_optimizer_step(self, model, step: int) -> None:
        """After the optimizer step, before the gradients are cleared; `step` counts the optimizer steps completed
        before this one."""

    def state_dict(self) -> dict:
        """What exact resume needs beyond the weights and the optimizer (saved in the checkpoint's extra.pt)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _TunelabRuntime(AdapterRuntime):
    """tunelab's own tuners (models/tuners): each micro-batch's rows set per-row state (ReFT's prompt positions)."""

    def before_forward(self, model, batch: dict) -> None:
        from tunelab.models import tuners

        tuners.before_forward(unwrap(model), batch)


class _AdaLoraRuntime(AdapterRuntime):
    """AdaLoRA: the orthogonality penalty on P and Q, the rank budget reallocated after every optimizer step, and
    the rank allocator's running scores kept for exact resume."""

    def __init__(self, model):
        self._adalora = model.base_model  # peft's AdaLoraModel: owns the rank allocator
        self._config = model.active_peft_config  # its rank_pattern changes during training
        self.orth_reg = float(self._config.orth_reg_weight)

    def extra_loss(self, model):
        """The orthogonality penalty: mean over matrices of ||P P^T - I||_F (resp. Q^T Q), weighted by orth_reg."""
        return None if self.orth_reg == 0.0 else self.orth_reg * adalora_orth_penalty(model)

    def after_optimizer_step(self, model, step: int) -> None:
        """Update importance scores from this step's gradients and prune ranks to the budget (after the optimizer
        step, so pruned values stay zero)."""
        self._adalora.update_and_allocate(step)

    def state_dict(self) -> dict:
        """The rank allocator's running scores and the current rank pattern (checkpoints hold the adapter at full
        rank, with pruned values zero)."""
        alloc = self._adalora.rankallocator
        state: dict = {k: {n: t.detach().clone() for n, t in getattr(alloc, k).items()}
                       for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
        pattern = self._config.rank_pattern
        state["rank_pattern"] = dict(pattern) if pattern else None
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        alloc = self._adalora.rankallocator
        for k in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, k, dict(state[k]))
        self._config.rank_pattern = state.get("rank_pattern")


ADAPTERS: dict[str, AdapterKind] = {
    "full": AdapterKind(_full, "full", "every parameter", mergeable=False, backend="model"),
    "freeze": AdapterKind(_freeze, "selective", "the last N decoder layers, named modules, embeddings and/or norms",
                          mergeable=False, backend="model"),
    "lora": AdapterKind(_lora, "reparameterised", "low-rank matrices A, B beside each adapted linear layer "
                        "(DoRA: plus a magnitude vector)", mergeable=True),
    "adalora": AdapterKind(_adalora, "reparameterised", "SVD-shaped low-rank triplets P, Λ, Q whose ranks are "
                           "pruned to a budget during training", mergeable=True, runtime_class=_AdaLoraRuntime),
    "ia3": AdapterKind(_ia3, "additive", "scaling vectors on keys, values and feed-forward activations",
                       mergeable=True),
    "ln": AdapterKind(_ln, "selective", "copies of the normalisation layers", mergeable=True),
    "vera": AdapterKind(_vera, "reparameterised", "per-layer scaling vectors d, b around frozen shared random "
                        "projections", mergeable=True),
    "oft": AdapterKind(_oft, "reparameterised", "block-diagonal orthogonal rotations of the weights",
                       mergeable=True),
    "boft": AdapterKind(_boft, "reparameterised", "butterfly-factored orthogonal rotations of the weights",
                        mergeable=True),
    "prefix": AdapterKind(_prefix, "additive", "key/value prefixes at every layer (or the MLP producing them)",
                          mergeable=False, packs=False),
    "prompt": AdapterKind(_prompt, "additive", "soft-prompt embeddings prepended to the input", mergeable=False,
                          packs=False),
    "ptuning": AdapterKind(_ptuning, "additive", "a prompt encoder (MLP or LSTM) producing soft-prompt embeddings",
                           mergeable=False, packs=False),
    "bottleneck": AdapterKind(_tuner, "additive", "bottleneck MLPs after attention and/or MLP blocks",
                              mergeable=False, backend="tunelab"),
    "bitfit": AdapterKind(_tuner, "selective", "bias terms only (optionally added as zeros)", mergeable=True,
                          backend="tunelab"),
    "reft": AdapterKind(_tuner, "additive", "low-rank edits of hidden states at chosen layers and prompt positions",
                        mergeable=False, packs=False, backend="tunelab"),
}


def peft_backed(kind: str) -> bool:
    """Whether `adapter.type` `kind` trains through a peft-wrapped model (its runs import peft's adapter code)."""
    return kind in ADAPTERS and ADAPTERS[kind].backend == "peft"


def apply_adapter(model, cfg: AdapterBase, setup: AdapterSetup | None = None):
    """Prepare `model` for training with the configured fine-tuning type; returns the (possibly wrapped) model."""
    model = ADAPTERS[cfg.type].apply(model, cfg, setup or AdapterSetup())
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing and cfg.type != "full":
        # With a frozen embedding layer, checkpointed blocks would see inputs that need no grad.
        model.enable_input_require_grads()
    return model


def lr_scale(cfg: AdapterBase) -> Callable[[str], float] | None:
    """Per-parameter learning-rate multiples the adapter asks for (LoRA+: `lr_ratio` on the B matrices), or None."""
    ratio = getattr(cfg, "lr_ratio", 1.0)
    if cfg.type != "lora" or ratio == 1.0:
        return None
    return lambda name: ratio if ".lora_B." in name else 1.0


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def virtual_tokens(model) -> int:
    """Soft-prompt positions a peft prompt-learning model prepends to the input (0 for every other model)."""
    core = unwrap(model)
    if not is_peft(core):
        return 0
    pc = core.active_peft_config
    if not getattr(pc, "is_prompt_learning", False) or type(pc).__name__ == "PrefixTuningConfig":
        return 0  # prefixes live in the key/value cache, not in the sequence
    return int(pc.num_virtual_tokens)


def adalora_orth_penalty(model):
    import torch

    total, count = None, 0
    for name, p in model.named_parameters():
        if not p.requires_grad or p.numel() == 0 or not ("lora_A" in name or "lora_B" in name):
            continue
        cov = p @ p.T if "lora_A" in name else p.T @ p
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        term = torch.linalg.matrix_norm(cov - eye)
        total = term if total is None else total + term
        count += 1
    return None if total is None else total / count


# ------------------------------------------------------------------------------------------- saving, loading
def save_adapter(model, dest: Path, *, final: bool = False, output_dir: Path | None = None,
                 base_info: dict | None = None, state_dict: dict | None = None) -> None:
    """Write what trained: a whole HF folder (full/freeze), a peft adapter, or a tunelab adapter.

    `final`: PiSSA/OLoRA adapters are converted to a plain LoRA of rank 2r on the original base weights, so the
    result loads anywhere peft does; checkpoints keep the unconverted form (a resumed run re-derives the same
    residual base). `base_info` (e.g. the quantization the base was loaded with) is stored in tunelab_base.json so
    chat and export rebuild the same base. `state_dict`: the model's whole state when its own is split across
    processes (FSDP2 gathers it for the final save)."""
    from tunelab.models import tuners

    core = unwrap(model)
    if tuners.tuner_of(core) is not None:
        tuners.save_tuner(core, dest)
    elif is_peft(core):
        kwargs: dict = {} if state_dict is None else {"state_dict": state_dict}
        init_dir = output_dir / INIT_ADAPTER if output_dir is not None else None
        if final and init_dir is not None and (init_dir / "adapter_config.json").exists():
            kwargs["path_initial_model_for_weight_conversion"] = str(init_dir)
        pc = core.active_peft_config
        pattern = getattr(pc, "rank_pattern", None)
        adalora_ckpt = type(pc).__name__ == "AdaLoraConfig" and not final
        if adalora_ckpt:
            # a checkpoint keeps AdaLoRA at full rank (pruned values are zero) so that a resumed run, which builds
            # the adapter at full rank, loads it as is; the rank pattern goes with the loop's state
            pc.rank_pattern = None
        try:
            with quiet_peft_warnings(), warnings.catch_warnings():
                # ranks pruned to zero make peft warn about (ZeRO-3) unsharded tensors; they are simply empty
                warnings.filterwarnings("ignore", message=".*have invalid shape.*")
                core.save_pretrained(dest, safe_serialization=True, **kwargs)
        finally:
            if adalora_ckpt:
                pc.rank_pattern = pattern
        if not final and getattr(pc, "is_prompt_learning", False):
            # peft saves the prompts a prompt encoder produced, not the encoder: a checkpoint keeps every trained
            # tensor as well, so a resumed run continues the encoder itself
            from safetensors.torch import save_file

            save_file({n: p.detach().contiguous() for n, p in core.named_parameters() if p.requires_grad},
                      str(Path(dest) / TRAINABLE_STATE))
        if "path_initial_model_for_weight_conversion" in kwargs:
            # peft rewrites the initial adapter's config while converting; it is not needed afterwards
            import shutil

            shutil.rmtree(init_dir, ignore_errors=True)
    else:
        from tunelab.models.lowrank import write_ranks

        core.save_pretrained(dest, safe_serialization=True,
                             **({} if state_dict is None else {"state_dict": state_dict}))
        write_ranks(core, dest)  # a low-rank model's factored layers (models/lowrank.py) load again from it
        return
    if base_info:
        (Path(dest) / BASE_INFO).write_text(json.dumps(base_info, indent=1))


def load_adapter_state(model, folder: Path) -> bool:
    """Restore trained adapter tensors saved by `save_adapter` into an already-built model; False if the model
    carries no adapter (full/freeze restore the whole folder instead)."""
    from safetensors.torch import load_file

    from tunelab.models import tuners

    core = unwrap(model)
    if tuners.tuner_of(core) is not None:
        tuners.load_tuner_state(core, load_file(str(folder / "adapter_model.safetensors")))
        return True
    if not is_peft(core):
        return False
    if (folder / TRAINABLE_STATE).exists():
        import torch

        state = load_file(str(folder / TRAINABLE_STATE))
        params = {n: p for n, p in core.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            odd = sorted(set(state) ^ set(params))[0]
            raise UserError(f"{folder}: trained tensors do not match this model ({odd})")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
        return True
    from peft import set_peft_model_state_dict

    state = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(core, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{folder}: adapter weights do not match this model ({unexpected[0]} unexpected)")
    return True


def adapter_folder_kind(folder: str | Path) -> str | None:
    """'peft', 'tunelab' or None for a folder that is no adapter."""
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        return "peft"
    if (folder / "tunelab_adapter.json").exists():
        return "tunelab"
    return None


def read_base_info(folders: Iterable[str | Path]) -> dict:
    """The base-model settings the adapters were trained on (they must agree)."""
    found: dict = {}
    for f in folders:
        path = Path(f) / BASE_INFO
        if path.exists():
            info = json.loads(path.read_text())
            if found and info != found:
                raise UserError(f"--adapter: {f} was trained on a differently loaded base ({info}) than the "
                                f"other adapters ({found})")
            found = info
    return found


def merge_adapter_folder(model, folder: str | Path, *, what: str = "adapter"):
    """`model` with the adapter saved in `folder` merged into its weights: a frozen model built from a base and an
    adapter trained on it (method kd's teacher). peft adapters of the weight-based kinds and tunelab's mergeable
    tuners merge; prompt-learning adapters and unmergeable tuners, which change the model's inputs or structure
    rather than its weights, are refused. `what` names the option in messages."""
    from tunelab.models import tuners
    from tunelab.models.load import check_weights_format

    kind = adapter_folder_kind(folder)
    if kind is None:
        raise UserError(f"{what}: {folder} has no adapter_config.json or tunelab_adapter.json; is it an adapter "
                        "folder?")
    check_weights_format(str(folder), allow_pickle=False, what=what)
    if kind == "tunelab":
        name = json.loads((Path(folder) / "tunelab_adapter.json").read_text()).get("tunelab_adapter", "")
        if not tuners.mergeable(name):
            raise UserError(f"{what}: {folder} holds a {name} adapter, which cannot be merged into the weights; "
                            "export the model with it first (tunelab export) and give that folder")
        return tuners.merge_tuner(tuners.load_tuner(model, Path(folder), trainable=False))
    peft_type = str(json.loads((Path(folder) / "adapter_config.json").read_text()).get("peft_type", ""))
    if peft_type in PROMPT_LEARNING:
        raise UserError(f"{what}: {folder} is a {peft_type.lower()} adapter, which adds positions to the input "
                        "instead of changing weights; export the model with it first (tunelab export)")
    from peft import PeftModel

    try:
        with quiet_peft_warnings():
            merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{what}: {folder} does not fit its model: {str(e).splitlines()[0]}") from None
    return merged
