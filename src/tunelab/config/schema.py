"""The configuration schema: one dataclass per section, help text written once per field.

Every field's help (``metadata["help"]``) feeds ``tunelab config``, ``tunelab train --help`` and docs/config.md.
Sections whose keys depend on a chosen type (``adapter``, ``method``) are tagged unions: the ``type`` key picks the
dataclass from ``ADAPTER_CONFIGS`` / ``METHOD_CONFIGS``. These dicts are the user-facing registries of names; the
implementations live in ``tunelab.models.adapters`` and ``tunelab.methods``. The schema lives here, below them, so that
a config can be validated (and ``--help`` answered) without importing torch.

Cross-field rules live next to the section they concern, in its ``validate`` method.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal

from tunelab.errors import ConfigError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text. Mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)) or is_dataclass(default):
        value = default
        return field(default_factory=lambda: copy.deepcopy(value), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# ----------------------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """The base model to fine-tune."""

    path: str = opt("", "Local Hugging Face model folder, or a hub id where a hub is reachable.")
    tokenizer: str | None = opt(None, "Tokenizer folder or hub id; defaults to model.path.")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = opt(
        "auto",
        "Storage dtype of the base weights. auto: float32 on CPU; on a GPU, bfloat16 where supported for frozen "
        "bases (lora, freeze) and float32 master weights for full fine-tuning. float64 is for numerical checks "
        "(two runs that must agree exactly, such as packed against padded): adapters, losses and metrics follow it, "
        "at about twice float32's time and memory.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = opt(
        "sdpa", "Attention kernel passed to transformers (sdpa works everywhere; flash_attention_* need CUDA)."
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass (non-reentrant): less memory, ~30% more compute."
    )
    offload_activations: bool = opt(
        False, "CUDA only: keep activations saved for the backward pass in pinned CPU memory (less GPU memory, "
               "slower steps)."
    )
    compile: bool = opt(
        False, "torch.compile the model (dynamic shapes). Pays a compilation cost at start; faster steps on GPUs."
    )
    liger_kernels: bool = opt(
        False, "CUDA only: Liger's fused RMSNorm, RoPE and SwiGLU kernels (needs the liger-kernel package)."
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = opt(
        "none",
        "Load the frozen base weights quantized through bitsandbytes (QLoRA with a peft adapter): nf4 or fp4 "
        "4-bit, or int8. Only for adapters that leave the base frozen (not full/freeze). Works on CPU and CUDA.",
    )
    double_quant: bool = opt(True, "4-bit: quantize the per-block scales too (QLoRA's double quantization).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "4-bit: dtype the dequantized weights are multiplied in; auto: bfloat16 on GPUs that support it, "
                "float32 on CPU."
    )
    trust_remote_code: bool = opt(False, "Allow model code shipped with the checkpoint to run. Off unless you trust it.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) when model.path is a hub id.")
    allow_pickle: bool = opt(
        False,
        "Load weights stored as pickle (pytorch_model.bin, *.pt) when a folder has no safetensors. Unpickling runs "
        "code from the file: off unless you trust where the folder came from.",
    )

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path: required (a local model folder or a hub id)")


# ------------------------------------------------------------------------------------------------------------ data
@dataclass
class DatasetSpec:
    """One dataset: a file (or folder of files) or a named entry in a registry file."""

    path: str | None = opt(
        None,
        "Data file (.json, .jsonl, .csv, .parquet, or .txt: one row per non-blank line), a folder of .json, .jsonl, "
        ".csv or .parquet files, or a hub dataset id (org/name) where a hub is reachable.",
    )
    name: str | None = opt(None, "Name of an entry in the registry file (see `registry`).")
    registry: str | None = opt(
        None, "Registry file mapping names to datasets; LLaMA-Factory's dataset_info.json is accepted as-is."
    )
    format: Literal["auto", "alpaca", "sharegpt", "openai", "text"] = opt(
        "auto", "Row format. auto detects it from the columns of the first row."
    )
    columns: dict[str, str] = opt(
        {},
        "Column names when they differ from the format's defaults, LLaMA-Factory style: prompt, query, response, "
        "history, system, messages, tools, text; for preference data chosen, rejected; for KTO data kto_tag.",
    )
    tags: dict[str, str] = opt(
        {},
        "ShareGPT tags when they differ from the defaults: role_tag, content_tag, user_tag, assistant_tag, "
        "observation_tag, function_tag, system_tag.",
    )
    max_samples: int | None = opt(None, "Use at most this many rows of this dataset (the first ones).")

    def validate(self, prefix: str) -> None:
        if bool(self.path) == bool(self.name):
            raise ConfigError(f"{prefix}: give exactly one of 'path' (a data file) or 'name' (a registry entry)")
        if self.name and not self.registry:
            raise ConfigError(f"{prefix}.registry: required with 'name' (the dataset_info.json that defines it)")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ConfigError(f"{prefix}.max_samples: must be positive, got {self.max_samples}")


@dataclass
class DataConfig:
    """Training data, chat template and loss masking."""

    train: list[DatasetSpec] = opt([], "Training datasets; several are concatenated.")
    val: list[DatasetSpec] = opt([], "Validation datasets. When empty, val_size of the training rows is held out.")
    val_size: float = opt(
        0.0, "Fraction (< 1) or number (>= 1) of training rows held out for validation when `val` is empty."
    )
    template: str = opt(
        "auto",
        "Chat template: auto uses the tokenizer's own jinja template, else a built-in name (default, alpaca, "
        "chatml, qwen, llama3, mistral, gemma, phi), or a path to a .jinja file.",
    )
    system: str | None = opt(None, "Default system prompt for rows that have none.")
    max_length: int = opt(1024, "Maximum tokens per row; longer rows are truncated (and counted in the report).")
    train_on_prompt: bool = opt(False, "Train on every token, prompts included (default: assistant turns only).")
    mask_history: bool = opt(False, "Train only on the last assistant turn of multi-turn rows.")
    on_bad_row: Literal["error", "skip"] = opt(
        "error", "What to do with invalid rows: error stops with their FILE:LINE list; skip trains on the rest."
    )
    shuffle: bool = opt(True, "Shuffle training rows every epoch (seeded by train.seed).")
    cache: bool = opt(
        True,
        "Cache tokenized rows on disk, keyed by the data files' content, tokenizer, template, max_length and "
        "masking options; a run with the same inputs skips tokenization.",
    )
    cache_dir: str | None = opt(None, "Tokenization cache folder (default: $TUNELAB_CACHE/tokenized or "
                                      "~/.cache/tunelab/tokenized).")
    num_proc: int = opt(1, "Worker processes for tokenization (worth it for tens of thousands of rows and more).")
    streaming: bool = opt(
        False,
        "Read, check and tokenize rows lazily while training, holding only a shuffle buffer in memory (for data "
        "that does not fit). Needs train.max_steps; validation comes from data.val only.",
    )
    shuffle_buffer: int = opt(10000, "Rows held in the shuffle buffer of a streamed dataset.")
    replace: dict[str, str] = opt(
        {},
        "Fill {{placeholders}} in the data: {name: Ada, author: Lab} turns every {{name}} and {{author}} in prompts "
        "and answers into those words (LLaMA-Factory's identity data uses them). Rows that still hold a {{...}} "
        "placeholder are reported with a warning.",
    )
    packing: Literal["auto", "none", "group_by_length", "padding_free"] = opt(
        "auto",
        "How a micro-batch becomes tensors. none: pad rows to the longest; group_by_length: the same, with rows of "
        "similar length batched together; padding_free: pack the micro-batch's rows into as few rows of at most "
        "max_length as fit, each sequence attending only to itself (same loss as unpacked, little padding). auto: "
        "padding_free when a one-off check on the model shows packed and unpacked outputs agree, else none.",
    )

    def validate(self, prefix: str) -> None:
        if not self.train:
            raise ConfigError(f"{prefix}.train: at least one dataset is required")
        if self.max_length < 8:
            raise ConfigError(f"{prefix}.max_length: must be at least 8, got {self.max_length}")
        if self.val_size < 0:
            raise ConfigError(f"{prefix}.val_size: must be >= 0, got {self.val_size}")
        if self.streaming and self.val_size > 0:
            raise ConfigError(f"{prefix}.val_size: not available with data.streaming; list validation sets in "
                              f"{prefix}.val")
        if self.streaming and self.packing == "group_by_length":
            raise ConfigError(f"{prefix}.packing: group_by_length needs the whole dataset; with data.streaming use "
                              "padding_free or none")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"{prefix}.shuffle_buffer: must be >= 1, got {self.shuffle_buffer}")
        if self.num_proc < 1:
            raise ConfigError(f"{prefix}.num_proc: must be >= 1, got {self.num_proc}")
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ConfigError(f"{prefix}.val_size: a fraction below 1 or a whole number of rows, got {self.val_size}")


# --------------------------------------------------------------------------------------------------------- adapter
ADAPTER_TYPES = ("full | freeze | lora | adalora | ia3 | ln | vera | oft | boft | prefix | prompt | ptuning | "
                 "bottleneck | bitfit | reft")
_TYPE_HELP = f"Fine-tuning type: {ADAPTER_TYPES}. docs/methods.md describes each."


def _type(name: str) -> Any:
    return opt(name, _TYPE_HELP)


def _check_positive(prefix: str, obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{prefix}.{name}: must be positive, got {getattr(obj, name)}")


def _check_dropout(prefix: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{prefix}.dropout: must be in [0, 1), got {value}")


@dataclass
class AdapterBase:
    type: str = _type("lora")

    def validate(self, prefix: str) -> None:
        pass


@dataclass
class FullAdapter(AdapterBase):
    """Train every parameter."""

    type: str = _type("full")


@dataclass
class FreezeAdapter(AdapterBase):
    """Selective: train the last N decoder layers, named modules, the embeddings and/or the norms; freeze the rest."""

    type: str = _type("freeze")
    layers: int = opt(2, "Number of decoder layers to train, counted from the last (0: none).")
    modules: list[str] = opt(
        [],
        "Extra trainable modules by name or suffix (e.g. embed_tokens, lm_head, mlp, self_attn.o_proj); matched on "
        "the dotted parameter name.",
    )
    embeddings: bool = opt(False, "Also train the input embeddings and the output head.")
    norms: bool = opt(False, "Also train every normalisation layer (RMSNorm/LayerNorm weights and biases).")

    def validate(self, prefix: str) -> None:
        if self.layers < 0:
            raise ConfigError(f"{prefix}.layers: must be >= 0, got {self.layers}")
        if self.layers == 0 and not self.modules and not self.embeddings and not self.norms:
            raise ConfigError(f"{prefix}: nothing to train; set layers > 0, list modules, or set embeddings/norms")


@dataclass
class PeftAdapterBase(AdapterBase):
    """Fields every adapter saved on its own (not as a whole model) shares."""

    path: str | None = opt(None, "Start from this saved adapter folder (continue training) instead of a fresh one.")


_TARGET_HELP = "Modules to adapt: all-linear, or a list of module-name suffixes (e.g. [q_proj, v_proj])."


@dataclass
class LoraAdapter(PeftAdapterBase):
    """Reparameterised: low-rank updates B·A added to linear layers (peft), with rsLoRA, DoRA, LoRA+ and PiSSA,
    OLoRA, LoftQ or EVA initialisation. QLoRA is this adapter on a quantized base (model.quantization)."""

    type: str = _type("lora")
    r: int = opt(8, "LoRA rank.")
    alpha: float = opt(16.0, "LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = opt(0.0, "Dropout on the LoRA input.")
    target: str | list[str] = opt("all-linear", _TARGET_HELP)
    rslora: bool = opt(False, "Rank-stabilised scaling alpha / sqrt(r).")
    dora: bool = opt(False, "Weight-decomposed LoRA (DoRA): learns magnitude and direction separately.")
    modules_to_save: list[str] = opt([], "Modules trained fully and saved with the adapter (e.g. [lm_head]).")
    lr_ratio: float = opt(
        1.0, "LoRA+: learning rate of the B matrices as a multiple of train.lr (the LoRA+ paper uses 16); 1 is "
        "plain LoRA. A matrices and other trainable modules keep train.lr."
    )
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "eva"] = opt(
        "default",
        "Initialisation. default: A random, B zero (the update starts at 0); gaussian: A Gaussian; pissa: A, B from "
        "the top-r singular vectors of each weight, which keeps the residual (principal singular values and "
        "vectors train); olora: A, B from a QR decomposition; loftq: on a quantized base, A, B approximate the "
        "quantization error (needs model.quantization); eva: A from the SVD of the layer inputs on the first "
        "training batches (data-driven). pissa and olora change the base weights in memory; the saved adapter is "
        "converted to a plain LoRA of rank 2r on the original base, so export and other tools need nothing special.",
    )
    init_iters: int = opt(
        0, "pissa: 0 uses an exact SVD, N > 0 a randomised SVD with N subspace iterations (fast on large "
        "weights); eva: batches used for the input SVD (0: 4)."
    )

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "r", "lr_ratio")
        _check_dropout(prefix, self.dropout)
        if self.init_iters < 0:
            raise ConfigError(f"{prefix}.init_iters: must be >= 0, got {self.init_iters}")
        if self.init in ("pissa", "olora", "loftq", "eva") and self.dora:
            raise ConfigError(f"{prefix}.init: {self.init} initialisation cannot be combined with dora")


@dataclass
class AdaLoraAdapter(PeftAdapterBase):
    """Reparameterised: SVD-shaped LoRA whose rank budget is reallocated during training by importance (peft). The
    loop runs the budget schedule: ranks start at r, shrink between warmup and final_steps to an average of
    target_r, and stay fixed after."""

    type: str = _type("adalora")
    r: int = opt(12, "Initial rank of every adapted layer.")
    target_r: int = opt(8, "Average rank after the budget schedule.")
    alpha: float = opt(16.0, "Scaling numerator (the update is scaled by alpha / r).")
    dropout: float = opt(0.0, "Dropout on the adapter input.")
    target: str | list[str] = opt("all-linear", _TARGET_HELP)
    warmup: float = opt(0.1, "Steps before ranks start to shrink, as a fraction of all steps (or a count if >= 1).")
    final: float = opt(0.2, "Steps at the end with the final ranks fixed, as a fraction of all steps (or a count).")
    interval: int = opt(10, "Steps between two budget reallocations.")
    beta1: float = opt(0.85, "Smoothing of the importance scores.")
    beta2: float = opt(0.85, "Smoothing of their uncertainty.")
    orth_reg: float = opt(0.5, "Weight of the orthogonality penalty on P and Q.")

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "r", "target_r", "interval")
        _check_dropout(prefix, self.dropout)
        if self.target_r > self.r:
            raise ConfigError(f"{prefix}.target_r: must be <= r ({self.r}), got {self.target_r}")
        if self.warmup < 0 or self.final < 0:
            raise ConfigError(f"{prefix}.warmup/final: must be >= 0")


@dataclass
class IA3Adapter(PeftAdapterBase):
    """Additive: learned vectors that rescale keys, values and the feed-forward activations (IA3, peft)."""

    type: str = _type("ia3")
    target: str | list[str] = opt(
        "auto", "Modules whose outputs (or, for feedforward ones, inputs) are rescaled; auto: peft's choice for "
        "the architecture (k_proj, v_proj, down_proj on Llama)."
    )
    feedforward: list[str] = opt(
        [], "Which of the targets are feed-forward layers (scaled on their input); empty with target auto: peft's "
        "choice."
    )


@dataclass
class LNTuningAdapter(PeftAdapterBase):
    """Selective: train only the normalisation layers (LN-tuning, peft); saved as an adapter."""

    type: str = _type("ln")
    target: str | list[str] = opt("auto", "Norm modules to train; auto: every RMSNorm/LayerNorm of the decoder.")


@dataclass
class VeraAdapter(PeftAdapterBase):
    """Reparameterised: one pair of frozen random matrices shared by all layers, with trained per-layer scaling
    vectors (VeRA, peft). Very few trainable parameters."""

    type: str = _type("vera")
    r: int = opt(256, "Rank of the shared random projections.")
    target: str | list[str] = opt("all-linear", _TARGET_HELP)
    dropout: float = opt(0.0, "Dropout on the adapter input.")
    d_initial: float = opt(0.1, "Initial value of the d scaling vector.")
    projection_seed: int = opt(0, "Seed of the shared random projections.")

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "r")
        _check_dropout(prefix, self.dropout)


@dataclass
class OFTAdapter(PeftAdapterBase):
    """Reparameterised: block-diagonal orthogonal rotations of the weights (OFT, peft)."""

    type: str = _type("oft")
    block_size: int = opt(16, "Size of each orthogonal block (must divide the adapted layers' input size).")
    target: str | list[str] = opt("all-linear", _TARGET_HELP)
    dropout: float = opt(0.0, "Multiplicative dropout of whole blocks.")
    coft: bool = opt(False, "Constrained OFT: keep the rotation within eps of the identity.")
    eps: float = opt(6e-5, "The constraint radius of coft.")

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "block_size")
        _check_dropout(prefix, self.dropout)


@dataclass
class BOFTAdapter(PeftAdapterBase):
    """Reparameterised: orthogonal rotations factored into butterfly matrices (BOFT, peft)."""

    type: str = _type("boft")
    block_size: int = opt(8, "Size of each butterfly block.")
    butterfly: int = opt(1, "Number of butterfly factors (1 is plain block-diagonal OFT).")
    target: str | list[str] = opt("all-linear", _TARGET_HELP)
    dropout: float = opt(0.0, "Multiplicative dropout of whole blocks.")

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "block_size", "butterfly")
        _check_dropout(prefix, self.dropout)


@dataclass
class PrefixAdapter(PeftAdapterBase):
    """Additive: trained key/value prefixes at every layer (prefix tuning, peft). With projection: false this is
    P-tuning v2's deep prompts; with projection: true the prefixes come from an MLP, as in the prefix-tuning paper."""

    type: str = _type("prefix")
    virtual_tokens: int = opt(16, "Prefix length (key/value positions added to every layer).")
    projection: bool = opt(False, "Generate the prefixes with a two-layer MLP (reparameterisation) instead of "
                                  "training them directly.")
    projection_hidden: int = opt(512, "Hidden size of that MLP.")

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "virtual_tokens", "projection_hidden")


@dataclass
class PromptAdapter(PeftAdapterBase):
    """Additive: trained soft-prompt embeddings prepended to the input (prompt tuning, peft)."""

    type: str = _type("prompt")
    virtual_tokens: int = opt(16, "Number of soft-prompt embeddings.")
    init_text: str | None = opt(None, "Initialise the prompt from the embeddings of this text (repeated or cut to "
                                      "virtual_tokens); default: random.")

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "virtual_tokens")


@dataclass
class PTuningAdapter(PeftAdapterBase):
    """Additive: soft prompts produced by a small encoder (P-tuning v1, peft). For P-tuning v2 use prefix."""

    type: str = _type("ptuning")
    virtual_tokens: int = opt(16, "Number of soft-prompt embeddings.")
    encoder: Literal["mlp", "lstm"] = opt("mlp", "Prompt encoder.")
    encoder_hidden: int = opt(128, "Hidden size of the prompt encoder.")
    dropout: float = opt(0.0, "Dropout in the prompt encoder.")

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "virtual_tokens", "encoder_hidden")
        _check_dropout(prefix, self.dropout)


@dataclass
class BottleneckAdapter(PeftAdapterBase):
    """Additive: Houlsby-style bottleneck modules (down-projection, activation, up-projection, residual) after the
    attention and/or MLP blocks of every decoder layer (tunelab's own; saved as safetensors)."""

    type: str = _type("bottleneck")
    where: list[Literal["attn", "mlp"]] = opt(["attn", "mlp"], "After which sub-blocks to insert an adapter.")
    reduction: int = opt(16, "Bottleneck size = hidden size / reduction.")
    activation: Literal["relu", "gelu", "silu"] = opt("relu", "Activation inside the bottleneck.")
    dropout: float = opt(0.0, "Dropout inside the bottleneck.")
    layers: list[int] = opt([], "Decoder layer indices to adapt (negative counts from the end); empty: all.")

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "reduction")
        _check_dropout(prefix, self.dropout)
        if not self.where:
            raise ConfigError(f"{prefix}.where: choose at least one of attn, mlp")


@dataclass
class BitFitAdapter(PeftAdapterBase):
    """Selective: train only the bias terms (BitFit). Models without biases (Llama, Mistral, ...) are refused
    unless add_bias is set, which adds zero biases to the linear layers of every decoder layer."""

    type: str = _type("bitfit")
    add_bias: bool = opt(
        False,
        "Add zero-initialised biases to the decoder's linear layers where the model has none (the output is "
        "unchanged at step 0). Exported models keep them; Llama-style configs get attention_bias/mlp_bias set.",
    )


@dataclass
class ReftAdapter(PeftAdapterBase):
    """Representation fine-tuning (LoReFT): a low-rank edit h + R^T(W h + b - R h) of the hidden states at chosen
    layers and prompt positions; the model's weights stay untouched (tunelab's own; saved as safetensors)."""

    type: str = _type("reft")
    layers: list[int] = opt([], "Decoder layers whose output is edited (negative counts from the end); empty: all.")
    r: int = opt(4, "Rank of the edit (rows of the orthonormal R).")
    first: int = opt(3, "Edit the first N positions of each prompt.")
    last: int = opt(3, "Edit the last N positions of each prompt (the prompt is everything before the first "
                       "trained token; at inference, the whole input).")
    dropout: float = opt(0.0, "Dropout on the edit.")

    def validate(self, prefix: str) -> None:
        _check_positive(prefix, self, "r")
        _check_dropout(prefix, self.dropout)
        if self.first < 0 or self.last < 0 or self.first + self.last == 0:
            raise ConfigError(f"{prefix}.first/last: >= 0, and at least one position")


# Adapter capabilities the config rules need (the config layer cannot import models/): the adapter types that train
# the base weights themselves, and those whose modules cannot carry a new score head (method rm). models/adapters.py
# AdapterKind answers the same questions for everything above the config; a test checks the two agree.
BASE_TRAINING_ADAPTERS = ("full", "freeze")
NO_SCORE_HEAD_ADAPTERS = ("bottleneck", "bitfit", "reft")

ADAPTER_CONFIGS: dict[str, type[AdapterBase]] = {
    "full": FullAdapter,
    "freeze": FreezeAdapter,
    "lora": LoraAdapter,
    "adalora": AdaLoraAdapter,
    "ia3": IA3Adapter,
    "ln": LNTuningAdapter,
    "vera": VeraAdapter,
    "oft": OFTAdapter,
    "boft": BOFTAdapter,
    "prefix": PrefixAdapter,
    "prompt": PromptAdapter,
    "ptuning": PTuningAdapter,
    "bottleneck": BottleneckAdapter,
    "bitfit": BitFitAdapter,
    "reft": ReftAdapter,
}


# ---------------------------------------------------------------------------------------------------------- method
METHOD_TYPES = "sft | pt | rm | dpo | kto | orpo | simpo | cpo | grpo | rloo | ppo | kd"
_METHOD_HELP = f"Training method: {METHOD_TYPES}."


def _method(name: str) -> Any:
    return opt(name, _METHOD_HELP)


@dataclass
class MethodBase:
    type: str = _method("sft")

    def validate(self, prefix: str) -> None:
        pass


@dataclass
class _LMOptions(MethodBase):
    """Options of the next-token cross-entropy that sft and pt share."""

    neftune_alpha: float = opt(
        0.0, "NEFTune: uniform noise in [-1, 1] x alpha / sqrt(L d) added to the input embeddings while training "
             "(L: the tokens of the token's own sequence, d: the embedding width), never at evaluation or "
             "generation; the paper uses 5 to 15. 0: off.")
    label_smoothing: float = opt(
        0.0, "Label smoothing of the cross-entropy on trained positions: (1 - e) x NLL + e x the mean NLL over "
             "the vocabulary (PyTorch's definition). The loss is then the smoothed one; nll and perplexity stay "
             "plain. 0: off.")

    def validate(self, prefix: str) -> None:
        if not self.neftune_alpha >= 0:
            raise ConfigError(f"{prefix}.neftune_alpha: must be >= 0 (0: off), got {self.neftune_alpha}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{prefix}.label_smoothing: in [0, 1), got {self.label_smoothing}")


@dataclass
class SFTMethod(_LMOptions):
    """Supervised fine-tuning on conversations: loss on assistant turns."""

    type: str = _method("sft")


@dataclass
class PTMethod(_LMOptions):
    """Continued pre-training on plain text: loss on every token."""

    type: str = _method("pt")


@dataclass
class RMMethod(MethodBase):
    """Reward modelling: a scalar score head on the decoder, trained on chosen/rejected pairs (Bradley-Terry)."""

    type: str = _method("rm")
    margin: float = opt(0.0, "Required score margin of chosen over rejected in the loss (0: plain Bradley-Terry).")
    center_rewards: float = opt(0.0, "Weight of a penalty on (chosen + rejected)^2 that keeps scores centred at 0 "
                                     "(0: off; 0.01 is common).")

    def validate(self, prefix: str) -> None:
        if self.margin < 0 or self.center_rewards < 0:
            raise ConfigError(f"{prefix}.margin/center_rewards: must be >= 0")


_PAIR_LOSS_HELP = ("sigmoid: DPO's -log sigmoid(beta h) (with label_smoothing: conservative cDPO); hinge: "
                   "relu(1 - beta h); ipo: (h - 1/(2 beta))^2 on length-averaged log-ratios; robust: rDPO, unbiased "
                   "under label noise label_smoothing. h is the chosen-minus-rejected log-ratio margin.")


def _check_beta_smoothing(prefix: str, beta: float, loss: str, smoothing: float) -> None:
    if beta <= 0:
        raise ConfigError(f"{prefix}.beta: must be positive, got {beta}")
    if not 0.0 <= smoothing < 0.5 or (smoothing and loss in ("hinge", "ipo")):
        raise ConfigError(f"{prefix}.label_smoothing: in [0, 0.5) and only with the sigmoid or robust loss, got "
                          f"{smoothing} with {loss}")


_REFERENCE_HELP = ("The reference policy. adapter_off: the same model with its adapter disabled (peft adapters; no "
                   "second copy in memory); copy: a frozen second copy of the base model; auto: adapter_off for peft "
                   "adapters, copy otherwise.")


@dataclass
class DPOMethod(MethodBase):
    """Direct preference optimisation on chosen/rejected pairs, against a frozen reference policy."""

    type: str = _method("dpo")
    beta: float = opt(0.1, "Strength of the implicit KL penalty (inverse temperature of the implicit reward).")
    loss: Literal["sigmoid", "hinge", "ipo", "robust"] = opt("sigmoid", _PAIR_LOSS_HELP)
    label_smoothing: float = opt(0.0, "Assumed fraction of flipped preference labels (cDPO with sigmoid, rDPO with "
                                      "robust).")
    sft_weight: float = opt(0.0, "Weight of an added NLL term on the chosen answers (RPO); 0: none.")
    reference: Literal["auto", "adapter_off", "copy"] = opt("auto", _REFERENCE_HELP)
    precompute_reference: bool = opt(
        False, "Score every pair with the reference once before training and keep only the numbers: no reference "
               "forward passes during training, and a reference copy is freed before the first step.")

    def validate(self, prefix: str) -> None:
        _check_beta_smoothing(prefix, self.beta, self.loss, self.label_smoothing)
        if self.sft_weight < 0:
            raise ConfigError(f"{prefix}.sft_weight: must be >= 0, got {self.sft_weight}")


@dataclass
class KTOMethod(MethodBase):
    """Kahneman-Tversky optimisation on unpaired answers labelled desirable or undesirable, against a frozen
    reference policy; the reference point is a KL estimate from mismatched prompt/answer pairs of the batch."""

    type: str = _method("kto")
    beta: float = opt(0.1, "Inverse temperature of the implicit reward.")
    desirable_weight: float = opt(1.0, "Loss weight of desirable answers (raise it when they are the minority).")
    undesirable_weight: float = opt(1.0, "Loss weight of undesirable answers.")
    reference: Literal["auto", "adapter_off", "copy"] = opt("auto", _REFERENCE_HELP)

    def validate(self, prefix: str) -> None:
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}: must be positive, got {getattr(self, name)}")


@dataclass
class ORPOMethod(MethodBase):
    """Odds-ratio preference optimisation: NLL on chosen plus an odds-ratio term; no reference model."""

    type: str = _method("orpo")
    beta: float = opt(0.1, "Weight of the odds-ratio term (ORPO's lambda).")

    def validate(self, prefix: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{prefix}.beta: must be positive, got {self.beta}")


@dataclass
class SimPOMethod(MethodBase):
    """Simple preference optimisation: length-normalised log-probabilities with a target margin; no reference."""

    type: str = _method("simpo")
    beta: float = opt(2.0, "Scale of the length-normalised reward.")
    gamma: float = opt(0.5, "Target reward margin (the paper's gamma; its repository's gamma_beta_ratio is "
                            "gamma / beta).")
    loss: Literal["sigmoid", "hinge"] = opt("sigmoid", "sigmoid: -log sigmoid(z); hinge: relu(1 - z).")
    label_smoothing: float = opt(0.0, "Assumed fraction of flipped labels (sigmoid only).")

    def validate(self, prefix: str) -> None:
        _check_beta_smoothing(prefix, self.beta, self.loss, self.label_smoothing)


_CPO_LOSS_HELP = ("sigmoid: -log sigmoid(beta h) (with label_smoothing: the conservative form); hinge: "
                  "relu(1 - beta h); ipo: (h - 1/(2 beta))^2 on length-averaged log-probabilities. h is the "
                  "policy's own chosen-minus-rejected log-probability margin (CPO has no reference model).")


@dataclass
class CPOMethod(MethodBase):
    """Contrastive preference optimisation: a DPO-style loss without a reference plus NLL on chosen."""

    type: str = _method("cpo")
    beta: float = opt(0.1, "Inverse temperature of the preference term.")
    loss: Literal["sigmoid", "hinge", "ipo"] = opt("sigmoid", _CPO_LOSS_HELP)
    label_smoothing: float = opt(0.0, "Assumed fraction of flipped labels (sigmoid only).")
    alpha: float = opt(1.0, "Weight of the NLL (behaviour cloning) term on the chosen answers.")

    def validate(self, prefix: str) -> None:
        _check_beta_smoothing(prefix, self.beta, self.loss, self.label_smoothing)
        if self.alpha < 0:
            raise ConfigError(f"{prefix}.alpha: must be >= 0, got {self.alpha}")


# ------------------------------------------------------------------------------------------------------ online RL
REWARD_BUILTINS = ("exact_match", "normalized_match", "regex_format", "overlong_penalty")


@dataclass
class RewardSpec:
    """One reward of an online RL method: a function in your own Python file, a built-in, or a reward model, with
    a weight."""

    function: str = opt("", "The function: its name in `file`, or a built-in without a file: exact_match, "
                            "normalized_match (answer vs a column), regex_format (pattern), overlong_penalty (DAPO's "
                            "soft length penalty). Empty with `model`.")
    model: str = opt("", "A reward model trained with method rm: its folder (full/freeze), or the base model with "
                         "`adapter` (LoRA); it scores each prompt with its completion.")
    adapter: str = opt("", "With `model`: the rm run's adapter folder (its final/).")
    file: str = opt("", "A Python file defining `function(prompts, completions, completion_ids, **columns)` "
                        "(TRL's reward-function signature; docs/rl.md). Naming a file runs its code.")
    weight: float = opt(1.0, "Weight of this reward in the total.")
    column: str = opt("answer", "exact_match / normalized_match: the prompt row's column holding the answer.")
    pattern: str = opt("", "regex_format: the regular expression the whole completion must match.")
    max_length: int = opt(0, "overlong_penalty: the length (tokens) beyond which the penalty is -1 (0: "
                             "method.max_new_tokens).")
    buffer: int = opt(16, "overlong_penalty: the tokens before max_length over which the penalty falls from 0 "
                          "to -1.")

    def validate(self, prefix: str) -> None:
        if self.model:
            if self.function or self.file:
                raise ConfigError(f"{prefix}: give either `model` (a reward model) or `function`, not both")
        elif self.adapter:
            raise ConfigError(f"{prefix}.adapter: needs `model` (the base the rm adapter was trained on)")
        if not self.function and not self.model:
            raise ConfigError(f"{prefix}.function: required (a built-in: {', '.join(REWARD_BUILTINS)}, or a "
                              "function of `file`), or `model` for a reward model")
        if self.model:
            return
        if not self.file and self.function not in REWARD_BUILTINS:
            close = difflib.get_close_matches(self.function, REWARD_BUILTINS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" ({', '.join(REWARD_BUILTINS)}), or give `file`"
            raise ConfigError(f"{prefix}.function: {self.function!r} is not a built-in reward{hint}")
        if not self.file and self.function == "regex_format" and not self.pattern:
            raise ConfigError(f"{prefix}.pattern: required for regex_format")
        if not math.isfinite(self.weight):
            raise ConfigError(f"{prefix}.weight: must be finite, got {self.weight}")
        if self.max_length < 0 or self.buffer < 1:
            raise ConfigError(f"{prefix}: max_length must be >= 0 and buffer >= 1")


@dataclass
class _SampledRLMethod(MethodBase):
    """Options shared by every online RL method: rewards, sampling, the clipped ratio and inner epochs."""

    rewards: list[RewardSpec] = opt([], "The rewards (a list; each a function with a weight); their weighted sum "
                                        "scores each completion.")
    num_generations: int = opt(8, "Completions sampled per prompt (the group). train.batch_size counts prompts: a "
                                  "micro-batch holds batch_size x num_generations completions.")
    max_new_tokens: int = opt(64, "Longest completion sampled (tokens).")
    temperature: float = opt(1.0, "Sampling temperature (0: greedy).")
    top_p: float = opt(1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass.")
    top_k: int = opt(0, "Keep only the k most likely tokens (0: off).")
    merge_adapter: Literal["auto", "on", "off"] = opt(
        "auto", "Sample with each plain LoRA layer merged into a temporary copy of its weight (one GEMM instead of "
                "three; the base weights are never written). It costs a copy of the adapted weights while "
                "sampling, which `tunelab plan` counts. auto: on when training on CPU (measured faster there), off "
                "on GPUs (where the copy would take accelerator memory); off samples through the adapter. Under "
                "train.distributed zero3/fsdp2 the weights are split across processes: LoRA samples unmerged.")
    epsilon: float = opt(0.2, "Lower clip of the ratio: 1 - epsilon.")
    epsilon_high: float = opt(0.0, "Upper clip of the ratio: 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); "
                                   "0: epsilon.")
    reference: Literal["auto", "adapter_off", "copy"] = opt("auto", _REFERENCE_HELP)
    mask_truncated: bool = opt(False, "Leave completions cut at max_new_tokens out of the loss (their rewards still "
                                      "count for their group's baseline).")
    num_iterations: int = opt(1, "Optimizer steps on each rollout batch (PPO's inner epochs; TRL's num_iterations): "
                                 "the ratio to the sampling policy then moves and the clip acts. An epoch of the "
                                 "prompts takes this many times more steps.")

    def validate(self, prefix: str) -> None:
        if not self.rewards:
            raise ConfigError(f"{prefix}.rewards: at least one reward is required (docs/rl.md)")
        if self.num_generations < 1:
            raise ConfigError(f"{prefix}.num_generations: at least 1, got {self.num_generations}")
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"{prefix}: max_new_tokens >= 1, temperature >= 0, top_p in (0, 1] and top_k >= 0")
        if not 0 < self.epsilon < 1 or self.epsilon_high < 0:
            raise ConfigError(f"{prefix}: epsilon in (0, 1) and epsilon_high >= 0")
        if self.num_iterations < 1:
            raise ConfigError(f"{prefix}.num_iterations: at least 1, got {self.num_iterations}")


@dataclass
class _OnlineRLMethod(_SampledRLMethod):
    """Options of the group methods (grpo, rloo): the loss normalisation, the KL term, dynamic sampling."""

    loss: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = opt(
        "dapo", "Normalisation of the policy loss: grpo (mean per sequence, sequences equal), dr_grpo (per-sequence "
                "sums / max_new_tokens), bnpo and dapo (sum over the completion tokens of the global batch; the same "
                "here). docs/rl.md.")
    importance_sampling: Literal["token", "sequence"] = opt(
        "token", "Importance ratio per token, or per sequence (GSPO: the geometric mean of its tokens' ratios).")
    beta: float = opt(0.0, "Weight of the KL penalty to the reference policy (k3 estimator per token); 0 skips the "
                           "reference.")
    dynamic_sampling: bool = opt(
        False, "DAPO's dynamic sampling: drop the groups whose rewards are all equal (no learning signal) and refill "
               "the batch with groups of further prompts drawn from the training data (docs/rl.md).")
    max_refills: int = opt(3, "dynamic_sampling: rollouts of further prompts at most per step; a batch still short "
                              "after them trains on the groups it has.")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.num_generations < 2:
            raise ConfigError(f"{prefix}.num_generations: at least 2 (advantages compare a prompt's completions)")
        if self.beta < 0:
            raise ConfigError(f"{prefix}.beta: must be >= 0, got {self.beta}")
        if self.max_refills < 0:
            raise ConfigError(f"{prefix}.max_refills: must be >= 0, got {self.max_refills}")


@dataclass
class GRPOMethod(_OnlineRLMethod):
    """Group relative policy optimisation: completions sampled per prompt, advantages relative to their group."""

    type: str = _method("grpo")
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group", "Divide advantages by the group's reward standard deviation, the batch's, or not at all (Dr. GRPO).")


@dataclass
class RLOOMethod(_OnlineRLMethod):
    """REINFORCE leave-one-out: each completion's baseline is the mean reward of the others of its prompt."""

    type: str = _method("rloo")


@dataclass
class PPOMethod(_SampledRLMethod):
    """Proximal policy optimisation with a learned critic: per-token rewards (the score at the last token, minus
    the KL to the reference at every token), GAE advantages, clipped policy and value losses."""

    type: str = _method("ppo")
    num_generations: int = opt(1, "Completions sampled per prompt. train.batch_size counts prompts: a micro-batch "
                                  "holds batch_size x num_generations completions.")
    num_iterations: int = opt(4, "Optimizer steps on each rollout batch (PPO's epochs; TRL's num_ppo_epochs). An "
                                 "epoch of the prompts takes this many times more steps.")
    critic: Literal["head", "model"] = opt(
        "head", "The value function. head: a linear value head on the policy's last hidden states (no second model; "
                "the value loss also trains the policy's trainable weights); model: a separate critic, a model with "
                "a scalar head trained in full beside the policy (TRL's value model).")
    critic_path: str = opt("", "critic: model: the folder the critic starts from, e.g. an rm run's final/ (a full "
                               "model with its score head); default the base model with a new head.")
    kl_coef: float = opt(0.05, "Per-token KL penalty to the reference, folded into the reward (0: no reference).")
    kl_estimator: Literal["k1", "k3"] = opt(
        "k1", "The per-token KL estimate in the reward: k1 = log pi - log ref (TRL's default), k3 = Schulman's "
              "non-negative estimator.")
    gamma: float = opt(1.0, "Discount factor of GAE.")
    lam: float = opt(0.95, "GAE's lambda: 1 is the Monte-Carlo return, 0 the one-step TD error.")
    vf_coef: float = opt(0.1, "Weight of the value loss in the total loss.")
    value_clip: float = opt(0.2, "Clip of the value prediction around the rollout's value (TRL's cliprange_value).")
    whiten_advantages: bool = opt(True, "Whiten the advantages over the completion tokens of the global batch.")
    whiten_rewards: bool = opt(False, "Whiten the per-token rewards over the global batch before GAE (the mean "
                                      "kept).")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.kl_coef < 0 or self.vf_coef < 0 or self.value_clip <= 0:
            raise ConfigError(f"{prefix}: kl_coef >= 0, vf_coef >= 0 and value_clip > 0")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"{prefix}: gamma and lam in [0, 1]")
        if self.critic_path and self.critic != "model":
            raise ConfigError(f"{prefix}.critic_path: needs critic: model")


# --------------------------------------------------------------------------------------------------- distillation
@dataclass
class TeacherSpec:
    """The teacher of method kd: a model folder, optionally with an adapter trained on it."""

    path: str = opt("", "The teacher's model folder (an HF folder, or a run's final/ folder of a full model). It "
                        "must share the student's vocabulary.")
    adapter: str = opt("", "An adapter folder trained on `path` (e.g. an sft run's final/); merged into the "
                           "teacher's weights when loaded.")

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path: required (the teacher's model folder)")


KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class KDMethod(MethodBase):
    """Knowledge distillation: the student learns the teacher's next-token distributions on the trained positions
    (logit distillation), optionally mixed with the data's cross-entropy and on the student's own samples (GKD)."""

    type: str = _method("kd")
    teacher: TeacherSpec = opt(TeacherSpec(), "The teacher model (path, adapter).")
    data: Literal["chat", "text"] = opt(
        "chat", "The rows distilled on: chat (conversations; the assistant turns are the trained positions, as sft) "
                "or text (every token, as pt: distillation on a corpus).")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = opt(
        "forward_kl", "The divergence per trained position: forward_kl = KL(teacher || student) (Hinton's KD, "
                      "mass-covering), reverse_kl = KL(student || teacher) (mode-seeking, MiniLLM), jsd = GKD's "
                      "generalized Jensen-Shannon divergence with `beta`.")
    beta: float = opt(0.5, "jsd: the teacher's weight in the mixture m = beta p_teacher + (1 - beta) p_student, in "
                           "(0, 1).")
    temperature: float = opt(1.0, "Softmax temperature of both distributions in the divergence; the term is "
                                  "multiplied by temperature^2 (Hinton) so its scale does not change with it.")
    alpha: float = opt(0.0, "Weight of the data's cross-entropy: loss = alpha x NLL + (1 - alpha) x divergence per "
                            "trained token (on rows the student sampled, only the divergence). 0: pure distillation.")
    top_k: int = opt(0, "Keep only the teacher's k most likely tokens per position, the rest of its mass in one "
                        "bucket (docs/distillation.md); needed by teacher_cache. 0: the whole vocabulary.")
    teacher_cache: str = opt(
        "", "A folder where the teacher's top-k distributions of every training and validation row are computed "
            "once and kept (offline KD): later runs on the same rows read them and never load the teacher, and the "
            "student trains without the teacher in memory. Needs top_k; empty: the teacher runs live.")
    lmbda: float = opt(0.0, "On-policy share (GKD's lambda): the share of optimizer steps whose answers the student "
                            "samples itself from the rows' prompts (chat data), distilled on the teacher's view of "
                            "them. 0: always the data's answers.")
    max_new_tokens: int = opt(128, "lmbda > 0: the longest answer the student samples (tokens).")
    sample_temperature: float = opt(1.0, "lmbda > 0: sampling temperature of the student's answers (0: greedy).")
    sample_top_p: float = opt(1.0, "lmbda > 0: nucleus sampling of the student's answers.")
    merge_adapter: Literal["auto", "on", "off"] = opt(
        "auto", "lmbda > 0: sample with plain LoRA merged into temporary weight copies (as the online RL methods; "
                "auto: on on CPU).")

    def validate(self, prefix: str) -> None:
        self.teacher.validate(f"{prefix}.teacher")
        if self.loss == "jsd" and not 0 < self.beta < 1:
            raise ConfigError(f"{prefix}.beta: jsd needs beta in (0, 1) (forward_kl and reverse_kl are the ends), "
                              f"got {self.beta}")
        if not self.temperature > 0:
            raise ConfigError(f"{prefix}.temperature: must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"{prefix}.alpha: in [0, 1], got {self.alpha}")
        if self.top_k < 0:
            raise ConfigError(f"{prefix}.top_k: must be >= 0 (0: the whole vocabulary), got {self.top_k}")
        if self.teacher_cache and not self.top_k:
            raise ConfigError(f"{prefix}.teacher_cache: needs top_k (a cache of whole-vocabulary distributions "
                              "would hold vocabulary x 4 bytes per trained token); 64 is common")
        if not 0 <= self.lmbda <= 1:
            raise ConfigError(f"{prefix}.lmbda: in [0, 1], got {self.lmbda}")
        if self.lmbda and self.teacher_cache:
            raise ConfigError(f"{prefix}.teacher_cache: the student's own samples (lmbda > 0) are new every step "
                              "and need the teacher live; use one or the other")
        if self.lmbda and self.data == "text":
            raise ConfigError(f"{prefix}.lmbda: on-policy distillation samples answers to prompts; it needs "
                              "data: chat")
        if self.max_new_tokens < 1 or self.sample_temperature < 0 or not 0 < self.sample_top_p <= 1:
            raise ConfigError(f"{prefix}: max_new_tokens >= 1, sample_temperature >= 0 and sample_top_p in (0, 1]")


METHOD_CONFIGS: dict[str, type[MethodBase]] = {
    "sft": SFTMethod,
    "pt": PTMethod,
    "rm": RMMethod,
    "dpo": DPOMethod,
    "kto": KTOMethod,
    "orpo": ORPOMethod,
    "simpo": SimPOMethod,
    "cpo": CPOMethod,
    "grpo": GRPOMethod,
    "rloo": RLOOMethod,
    "ppo": PPOMethod,
    "kd": KDMethod,
}


# ----------------------------------------------------------------------------------------------------------- train
# torch optimizers whose states are tensors shaped like their parameter (or scalars): ZeRO and FSDP2 shard them
SHARDABLE_OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging and checkpointing."""

    batch_size: int = opt(8, "Micro-batch size per device (rows per forward pass).")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step. Global batch = batch_size x grad_accum x devices.")
    lr: float = opt(2.0e-4, "Peak learning rate.")
    epochs: float = opt(1.0, "Passes over the training data (fractions allowed); ignored when max_steps > 0.")
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: use epochs).")
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "Learning-rate schedule after warm-up.")
    warmup_ratio: float = opt(0.0, "Warm-up length as a fraction of all steps.")
    warmup_steps: int = opt(0, "Warm-up length in steps (overrides warmup_ratio when > 0).")
    min_lr_ratio: float = opt(0.0, "Final learning rate of the cosine/linear decay as a fraction of lr.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "adafactor", "galore", "sgd"] = opt(
        "adamw",
        "adamw: torch AdamW; adamw_8bit: bitsandbytes AdamW with 8-bit blockwise states; paged_adamw(_8bit): "
        "bitsandbytes AdamW whose states live in CUDA unified memory and page out under memory pressure (plain "
        "states on CPU); adafactor: factored second moments, no first moment (transformers); galore: AdamW on "
        "low-rank projections of the gradients of 2-D weights (galore-torch), for full fine-tuning; sgd: SGD "
        "with momentum. `tunelab plan` reports each one's state memory.",
    )
    momentum: float = opt(0.9, "sgd: momentum (0: plain SGD, no state).")
    galore_rank: int = opt(128, "galore: rank of the gradient projection.")
    galore_gap: int = opt(200, "galore: steps between recomputing the projection.")
    galore_scale: float = opt(0.25, "galore: scale of the projected update.")
    galore_target: list[str] = opt(
        ["attn", "mlp"], "galore: 2-D weights whose name contains one of these are projected; the rest use AdamW."
    )
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only (not biases, norms or embeddings' norms).")
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas.")
    adam_eps: float = opt(1.0e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this value (0: no clipping).")
    distributed: Literal["ddp", "zero1", "zero2", "zero3", "fsdp2"] = opt(
        "ddp",
        "How several processes share the training (docs/distributed.md): ddp keeps a whole copy of the model, "
        "its gradients and optimizer states on every process; zero1, zero2 and zero3 (DeepSpeed ZeRO) shard the "
        "optimizer states, then the gradients too, then the parameters too across processes; fsdp2 (torch "
        "fully_shard) shards parameters, gradients and optimizer states per decoder layer. One process: "
        "the same training, unsharded.",
    )
    offload: Literal["none", "optimizer", "optimizer+params"] = opt(
        "none",
        "Keep sharded states in host memory instead of the GPU: optimizer (ZeRO-Offload: optimizer states and "
        "the update run on the CPU; zero1-3) or optimizer+params (zero3 also offloads parameters; fsdp2 "
        "offloads parameters, gradients and optimizer states together). Moot on a CPU-only machine.",
    )
    deepspeed: str = opt(
        "",
        "A DeepSpeed JSON config to use as it is (its ZeRO tuning knobs pass through). What tunelab also sets "
        "(the stage, offload, batch sizes, accumulation, clipping, precision) must agree with it: a difference "
        "is refused with the key named. Needs train.distributed zero1, zero2 or zero3.",
    )
    accelerate_config: str = opt(
        "",
        "An accelerate config YAML (accelerate config's output) to use as it is: its distributed type, ZeRO "
        "stage, FSDP version, offload, accumulation, clipping, precision and process layout must agree with "
        "the tunelab config and launch (a difference is refused with the key named).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto",
        "Compute precision: auto is fp32 on CPU and bf16 on GPUs that support it. bf16 on a CPU without native "
        "bf16 is refused (it runs ~26x slower); fp16 needs a CUDA GPU.",
    )
    qat: Literal["none", "int4", "int8"] = opt(
        "none",
        "Quantization-aware training (docs/compression.md): the decoder's linear layers compute with their weights "
        "fake-quantized to symmetric int4 or int8 (torchao's QAT; gradients pass straight through to the float "
        "weights), and final/ is saved as the compressed-tensors folder of those integers. adapter.type full or "
        "freeze, one process or ddp.",
    )
    qat_group_size: int = opt(
        32, "train.qat: inputs sharing one scale (it must divide every layer's input width); 0: one scale per "
        "output channel.")
    seed: int = opt(42, "Seed for initialisation, data order and dropout.")
    log_every: int = opt(10, "Log metrics every N optimizer steps (to metrics.jsonl and the console).")
    eval_every: int = opt(0, "Evaluate on the validation split every N steps (0: only at the end).")
    save_every: int = opt(100, "Save a checkpoint every N steps (0: only at the end).")
    save_total_limit: int = opt(2, "Keep only the last K checkpoints (0: keep all).")
    resume: str = opt(
        "auto", "auto: continue from the latest checkpoint in output.dir if there is one; never; or a checkpoint path."
    )
    loss_chunk: int = opt(
        4096,
        "The LM head and cross-entropy run only on trained positions, at most this many at a time (larger "
        "batches are chunked and recomputed in the backward pass, so full logits are never materialised; a chunk "
        "then also holds at most 32 MiB of fp32 logits). 0: compute logits for every position (the naive path, "
        "for comparison).",
    )

    def validate(self, prefix: str) -> None:
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"{prefix}.lr: must be a finite positive number, got {self.lr}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"{prefix}.max_steps: -1 (use epochs) or a positive number, got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ConfigError(f"{prefix}.epochs: must be positive, got {self.epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{prefix}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"{prefix}.adam_betas: two numbers, got {self.adam_betas}")
        if self.galore_rank < 1 or self.galore_gap < 1:
            raise ConfigError(f"{prefix}.galore_rank/galore_gap: must be >= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{prefix}.momentum: must be in [0, 1), got {self.momentum}")
        if self.qat_group_size < 0 or self.qat_group_size == 1:
            raise ConfigError(f"{prefix}.qat_group_size: 0 (per output channel) or at least 2, got "
                              f"{self.qat_group_size}")
        if self.qat != "none" and self.distributed != "ddp":
            raise ConfigError(f"{prefix}.qat: fake quantization reads whole weight matrices, which "
                              f"{self.distributed} splits across processes; use ddp")
        for name in ("eval_every", "save_every", "save_total_limit", "warmup_steps", "loss_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.offload != "none" and self.distributed == "ddp":
            raise ConfigError(f"{prefix}.offload: {self.offload} offloads sharded states; set "
                              f"{prefix}.distributed to zero1, zero2, zero3 or fsdp2")
        if self.offload == "optimizer+params" and self.distributed in ("zero1", "zero2"):
            raise ConfigError(f"{prefix}.offload: optimizer+params needs sharded parameters (zero3 or fsdp2); "
                              f"{self.distributed} offloads the optimizer only")
        if self.offload == "optimizer" and self.distributed == "fsdp2":
            raise ConfigError(f"{prefix}.offload: fsdp2 offloads parameters, gradients and optimizer states "
                              "together; use optimizer+params")
        if self.deepspeed and not self.distributed.startswith("zero"):
            raise ConfigError(f"{prefix}.deepspeed: a DeepSpeed config needs {prefix}.distributed zero1, zero2 or "
                              f"zero3 (it is {self.distributed})")
        if self.deepspeed and self.accelerate_config:
            raise ConfigError(f"{prefix}.deepspeed and {prefix}.accelerate_config: give one of them")
        if self.distributed != "ddp" and self.optimizer not in SHARDABLE_OPTIMIZERS:
            raise ConfigError(f"{prefix}.optimizer: {self.optimizer} keeps states the sharded engines cannot "
                              f"split; with {prefix}.distributed {self.distributed} use "
                              f"{' or '.join(SHARDABLE_OPTIMIZERS)}")


# ---------------------------------------------------------------------------------------------------------- output
@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = opt(
        "runs/run",
        "Output folder: run.json (history), config.yaml, metrics.jsonl, checkpoints/, final/, loss.png. It must be "
        "new, empty or an earlier tunelab run; one run at a time may use it (a second one is refused).",
    )
    overwrite: bool = opt(
        False,
        "Start over in an existing run folder: delete what the earlier run wrote there (and only that; other "
        "files stay). A folder that is not a tunelab run is never deleted. Happens once the new run has loaded "
        "its data and model.",
    )
    plot: bool = opt(True, "Write loss.png (loss curve) at the end of training.")
    report_to: list[Literal["tensorboard"]] = opt([], "Extra loggers: tensorboard (writes output.dir/tensorboard).")

    def validate(self, prefix: str) -> None:
        if not self.dir.strip():
            raise ConfigError(f"{prefix}.dir: must name a folder (an empty value would mean the current folder)")


# ------------------------------------------------------------------------------------------------------------ root
@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = opt(ModelConfig(), "The base model.")
    data: DataConfig = opt(DataConfig(), "Training data, template and masking.")
    adapter: AdapterBase = opt(LoraAdapter(), "Fine-tuning type and its options (see docs/methods.md).")
    method: MethodBase = opt(SFTMethod(), "Training method and its options (see docs/methods.md).")
    train: TrainConfig = opt(TrainConfig(), "Optimisation, precision, logging, checkpointing.")
    output: OutputConfig = opt(OutputConfig(), "Output folder and loggers.")

    def validate(self, prefix: str) -> None:
        # Rules that span sections (each section checks its own fields itself).
        if self.model.quantization != "none" and self.adapter.type in BASE_TRAINING_ADAPTERS:
            raise ConfigError(f"model.quantization: {self.model.quantization} quantizes frozen base weights; "
                              f"adapter.type {self.adapter.type} trains them (use lora or another adapter)")
        if getattr(self.adapter, "init", None) == "loftq" and self.model.quantization not in ("nf4", "fp4"):
            raise ConfigError("adapter.init: loftq approximates 4-bit quantization error; set model.quantization "
                              "to nf4 or fp4")
        if self.method.type == "rm" and self.adapter.type in NO_SCORE_HEAD_ADAPTERS:
            raise ConfigError(f"method.type: rm trains a new score head, which adapter {self.adapter.type} cannot "
                              "carry; use lora (or another peft adapter), freeze or full")
        if getattr(self.method, "merge_adapter", "auto") == "on" and self.train.distributed in ("zero3", "fsdp2"):
            raise ConfigError(f"method.merge_adapter: on merges LoRA into whole weights; under train.distributed "
                              f"{self.train.distributed} they are split across processes (use auto or off)")
        if self.train.qat != "none" and (self.adapter.type not in BASE_TRAINING_ADAPTERS
                                         or self.model.quantization != "none"):
            raise ConfigError(f"train.qat: trains the full-precision weights it fake-quantizes; needs adapter.type "
                              f"full or freeze and model.quantization none (got {self.adapter.type}, "
                              f"{self.model.quantization})")
        if self.train.optimizer == "galore" and self.adapter.type not in BASE_TRAINING_ADAPTERS:
            raise ConfigError(f"train.optimizer: galore projects gradients of full weight matrices; with adapter "
                              f"{self.adapter.type} use adamw (or set adapter.type=full)")


# Tagged-union sections: field type -> {type name: dataclass}.
TAGGED: dict[type, dict[str, type]] = {AdapterBase: ADAPTER_CONFIGS, MethodBase: METHOD_CONFIGS}
