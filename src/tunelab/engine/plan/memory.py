"""The peak memory of one device (one process) for one training configuration, and the largest micro-batch that fits.

The model of memory (docs/plan.md has the formulas and the validation against measured runs):

- weights, gradients and optimizer states: bytes per parameter by dtype, adapter, ZeRO stage and offload; the
  frozen decoder linears in their bitsandbytes format (model.quantization); optimizer states as each
  train.optimizer allocates them (optimizer.py); adapter types other than full/freeze/lora are counted by applying
  them to the model on the meta device (trainable.py);
- activations: the tensors autograd saves for backward in each decoder layer (activations.py);
- logits: the language-model loss's peak, which depends on how many positions get logits (`train.loss_chunk`);
- the peak itself is the largest of four moments of a step (end of forward, start of backward at the loss, inside
  the decoder backward, optimizer step), because activations are freed while gradients fill in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.engine.dist_config import bucket_sizes
from tunelab.engine.plan.activations import (
    _consumer_saves,
    _layer_linears,
    _layer_saves,
    _LayerSaves,
    _norm_saves,
    _Numerics,
)
from tunelab.engine.plan.model_shape import (
    QUANT_FORMATS,
    GiB,
    MiB,
    ModelShape,
    _quant_note,
    dtype_bytes,
    quantized_weight_bytes,
)
from tunelab.engine.plan.optimizer import (
    OPTIMIZERS,
    OptimizerSettings,
    _optimizer_detail,
    _step_temp,
    optimizer_state_bytes,
)
from tunelab.engine.plan.trainable import WIDE_BRANCH_ADAPTERS, AdapterParams, _trainable
from tunelab.errors import UserError
from tunelab.models.adapters import layer_index, peft_backed

# Resident memory of a CPU training process before any model tensor: the interpreter, torch, transformers, peft,
# accelerate and tokenizers code and heap, a tokenizer and a small dataset. Measured on the 2-core reference
# machine (Python 3.11, torch 2.13 CPU, transformers 5.24, peft 0.21) by `calibrate_cpu_runtime`: the peak RSS of a
# real run on a micro model, minus that run's modelled tensors (docs/plan.md). It changes with library versions
# (372 MiB with transformers 5.23), so `tunelab plan --calibrate` measures it for the machine at hand and plans use
# that measurement when one exists for the installed versions; tests calibrate before comparing with real runs.
CPU_RUNTIME_BYTES = 456 * MiB
# What a run whose model peft wraps holds beyond that: peft's adapter code imports its quantization back ends
# (bitsandbytes 0.50.2 compiles kernels with torch.compile at import: torch's dynamo and networkx). 43 MiB on the
# reference machine with peft 0.22 (calibrate_cpu_runtime(peft=True) measures it with the rest).
CPU_PEFT_RUNTIME_BYTES = 43 * MiB

# A CUDA process holds the context (kernels of torch, cuBLAS and cuDNN), library workspaces and the caching
# allocator's rounding slack outside torch's own tensor accounting: a few hundred MB on recent GPUs. Not measured
# here (no GPU); a documented estimate.
CUDA_RUNTIME_BYTES = 512 * MiB

# Host memory of tokenized rows held as Python lists of ints (input ids and labels): ~50 B/token when built by the
# tokenizer, ~80 when read back from the tokenization cache (separate int objects for labels). The larger is used.
DATASET_BYTES_PER_TOKEN = 80

# DeepSpeed's own default reduce bucket (elements), which a train.deepspeed file may restore (tunelab's default
# is sized to the model: dist_config.bucket_sizes); the gradient bucket is allocated at this size, capped at the
# number of trainable parameters. ZeRO-3 steps the optimizer over sub-groups of DEEPSPEED_SUB_GROUP_ELEMS.
DEEPSPEED_BUCKET_ELEMS = 500_000_000
DEEPSPEED_SUB_GROUP_ELEMS = 1_000_000_000
# ZeRO-3 gathers ahead up to stage3_prefetch_bucket_size elements beside the layer in use (DeepSpeed's default)
DEEPSPEED_PREFETCH_ELEMS = 50_000_000

COMPONENTS: tuple[str, ...] = (
    "runtime", "weights", "frozen_models", "trained_models", "rollout_cache", "weight_copies", "gradients",
    "optimizer", "activations", "logits", "buffers",
)
PHASES: dict[str, str] = {
    "forward": "end of the forward pass",
    "loss": "start of backward, at the loss",
    "backward": "inside the decoder backward",
    "optimizer": "optimizer step",
    "rollout": "sampling completions (online RL)",
}


# ------------------------------------------------------------------------------------------------------ result
@dataclass
class MemoryPlan:
    """Predicted peak memory of one device (one process): components in bytes at the peak moment, and why."""

    components: dict[str, int]
    notes: dict[str, str]
    phase: str  # key of PHASES: the moment of the step where the peak is
    phases: dict[str, int]  # total bytes at each modelled moment
    moments: dict[str, dict[str, int]] = field(default_factory=dict)  # components at every modelled moment
    host: dict[str, int] = field(default_factory=dict)  # bytes per process kept in host memory (offload)
    params: int = 0
    trainable: int = 0
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def frozen_model_bytes(shape: ModelShape, storage_dtype: str, quantization: str = "none",
                       double_quant: bool = True) -> float:
    """The weights of a frozen copy of a model: every parameter in the dtype it loads in, the decoder linears in
    their bitsandbytes format when quantized (a copy loads as the policy's base does, without the fp32 upcast
    training applies to the policy)."""
    s = dtype_bytes(storage_dtype)
    quant_linears = {name: o for name, _, o in shape.linears if name != shape.head} \
        if quantization != "none" else {}
    total = 0.0
    for name, n in shape.params:
        module = name.rsplit(".", 1)[0]
        if module in quant_linears and name.endswith(".weight"):
            total += quantized_weight_bytes(quantization, n, quant_linears[module], double_quant)
        else:
            total += n * s
    return total


def estimate(
    shape: ModelShape,
    *,
    adapter: str = "lora",
    lora_r: int = 8,
    lora_targets: str | Sequence[str] = "all-linear",
    trainable_layers: int = 0,
    trainable_modules: Sequence[str] = (),
    precision: str = "bf16",
    storage_dtype: str = "bf16",
    batch_size: int = 1,
    seq_len: int = 1024,
    grad_ckpt: bool = False,
    loss_chunk: int = 4096,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    devices: int = 1,
    fsdp2: bool = False,
    bucket_elems: int | None = None,
    prefetch_elems: int | None = None,
    live_elems: int | None = None,
    optimizer: str = "adamw",
    device: str = "cuda",
    attn_impl: str = "sdpa",
    attn_mask: bool = True,
    positions: int | None = None,
    trained_tokens: int | None = None,
    grad_accum: int = 1,
    dataset_tokens: int = 0,
    runtime_bytes: int | None = None,
    quantization: str = "none",
    double_quant: bool = True,
    optimizer_settings: OptimizerSettings | None = None,
    adapter_params: AdapterParams | None = None,
    frozen_models: Sequence[tuple[str, float]] = (),
    rollout: tuple[int, int] = (0, 0),
    trained_models: Sequence[tuple[str, ModelShape]] = (),
    rollout_merged: bool = False,
) -> MemoryPlan:
    """Predict the peak memory of one device (one process) for one training configuration.

    adapter: full | freeze (the last `trainable_layers` layers plus `trainable_modules`) | lora (`trainable_modules`
    are peft's modules_to_save) | qlora (lora with quantization nf4) | any other adapter type, whose trained
    tensors `adapter_params` lists. quantization: none | nf4 | fp4 | int8, the bitsandbytes format of the frozen
    decoder linears (`double_quant`: 4-bit scales quantized too). optimizer: a key of `OPTIMIZERS`, with
    `optimizer_settings` (sgd's momentum, GaLore's rank and targets). precision: compute dtype (fp32 | bf16 | fp16);
    storage_dtype: dtype the base weights are loaded in. A micro-batch is `batch_size` rows of `seq_len` positions
    (`positions` overrides the product, e.g. for packed rows); `trained_tokens` (default: every position but the
    last of each row) get logits when `loss_chunk` > 0, at most `loss_chunk` at a time; 0 is the naive path that
    computes logits everywhere. attn_mask: the batch carries a mask (padding or packed sequences) — SDPA then keeps
    a [B, 1, T, T] mask per layer. zero_stage 0 is tunelab's loop (accelerate autocast, DDP replicas over
    `devices`); 1-3 are DeepSpeed ZeRO, which keeps fp32 master weights of the trained parameters in its optimizer.
    fsdp2 (with zero_stage 0): torch fully_shard, every parameter, gradient and optimizer state split over
    `devices`, one decoder layer gathered at a time (and the next one prefetched), the rest of the model (embeddings,
    head, final norm) gathered from the forward to the backward; no master copies. bucket_elems, prefetch_elems,
    live_elems: DeepSpeed's reduce_bucket_size, stage3_prefetch_bucket_size and stage3_max_live_parameters; None
    is what tunelab sets when a config file does not, sized to the model (engine.dist_config.bucket_sizes). device: cuda | cpu (on CPU, host and device memory are the same and offload is moot).
    frozen_models: (what, bytes) of each frozen model a method holds beside the policy while training (a reference
    copy, a teacher: `frozen_model_bytes`); their weights count for the whole run, their no-grad forward
    temporaries do not. rollout: (sequences sampled at once per process, tokens per sequence at most) of an online
    RL method; sampling is its own moment of the step, before the forward (the KV cache is freed after it).
    rollout_merged: an online RL method samples with plain LoRA layers merged into temporary copies of their
    weights (method.merge_adapter): the sampling moment holds a copy of every adapted linear weight.
    trained_models: (what, shape) of each model that trains in full beside the policy on the same micro-batches (a
    critic); each is planned as a full fine-tune of its shape and adds, at every moment, its weights, optimizer
    state, gradients, activations and buffers at that moment (at sampling: its weights and optimizer state).
    runtime_bytes: the process's memory before any model tensor (default: `CPU_RUNTIME_BYTES` or
    `CUDA_RUNTIME_BYTES`; `calibrate_cpu_runtime` measures it with this machine's libraries).
    """
    if device not in ("cuda", "cpu"):
        raise UserError(f"plan: device must be cuda or cpu, got {device!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise UserError(f"plan: zero_stage must be 0-3, got {zero_stage}")
    if fsdp2 and zero_stage:
        raise UserError("plan: fsdp2 and DeepSpeed ZeRO are two engines; give one")
    if offload_params and zero_stage != 3:
        raise UserError("plan: offloading parameters needs ZeRO stage 3")
    if batch_size < 0 or seq_len < 1 or devices < 1 or grad_accum < 1:
        raise UserError("plan: batch_size >= 0, seq_len >= 1, devices >= 1 and grad_accum >= 1 are required")
    cpu = device == "cpu"
    if cpu:
        offload_optimizer = offload_params = False
    n_dev = devices
    deepspeed = zero_stage >= 1
    shards_params = (zero_stage == 3 or fsdp2) and n_dev > 1
    s_store = dtype_bytes(storage_dtype)
    c_prec = dtype_bytes(precision)
    mixed = c_prec != 4
    kind = "lora" if adapter == "qlora" else adapter
    if adapter == "qlora" and quantization == "none":
        quantization = "nf4"  # the historical name: LoRA on a 4-bit NF4 base
    if quantization not in QUANT_FORMATS:
        raise UserError(f"plan: unknown quantization {quantization!r}; use one of {', '.join(QUANT_FORMATS)}")
    quantized = quantization != "none"
    if quantized and kind in ("full", "freeze"):
        raise UserError(f"plan: {quantization} base weights are frozen; adapter {kind} trains them")
    opt_settings = optimizer_settings or OptimizerSettings()
    generic = kind not in ("full", "freeze", "lora")
    # soft prompts lengthen every row (their positions carry no labels)
    virtual = adapter_params.virtual_tokens if adapter_params is not None and generic else 0
    if virtual > 0:
        seq_len += virtual
        if positions is not None:
            positions += batch_size * virtual
    # tunelab runs autocast over the stored dtype under every engine; DeepSpeed adds fp32 masters in its optimizer
    s = s_store
    num = _Numerics(s=s, c=2 if mixed else s, autocast=mixed)

    tr = _trainable(shape, kind, lora_r=lora_r, lora_targets=lora_targets, trainable_layers=trainable_layers,
                    trainable_modules=() if kind == "full" else trainable_modules, adapter_params=adapter_params)
    # base parameters trained in place (for lora, tr.base are modules_to_save originals: frozen, copies train)
    in_place = kind != "lora"
    quant_linears = {name: o for name, _, o in shape.linears if name != shape.head} if quantized else {}
    sizes = dict(shape.params)

    # ---- weights, gradients, optimizer states (bytes per device)
    frozen_bytes = 0.0
    trainable_base = 0
    for name, n in shape.params:
        if name in tr.base and in_place:
            trainable_base += n
            continue
        module = name.rsplit(".", 1)[0]
        if module in quant_linears and name.endswith(".weight"):
            frozen_bytes += quantized_weight_bytes(quantization, n, quant_linears[module], double_quant)
        else:
            frozen_bytes += n * s
    # peft's adapters (and modules_to_save copies) are fp32 for a half-precision base and follow a float64 one;
    # DeepSpeed casts them to c
    adapter_bytes = max(4, s)
    n_extra = tr.lora_params + tr.save_copies + tr.added_params
    added_frozen = adapter_params.added_frozen if adapter_params is not None and generic else 0
    trainable = trainable_base + n_extra
    param_bytes = s if kind in ("full", "freeze") else adapter_bytes
    weights = frozen_bytes + trainable_base * s + (n_extra + added_frozen) * adapter_bytes
    grad_bytes = trainable_base * s + n_extra * adapter_bytes
    # every tensor the optimizer steps: (name, shape, bytes per element)
    dims = shape.dims
    tensors: list[tuple[str, tuple[int, ...], float]] = [(n, dims[n], s) for n, _ in shape.params
                                                         if n in tr.base and in_place]
    for name, n_in, n_out in tr.lora:
        tensors += [(f"{name}.lora_A.weight", (tr.lora_r, n_in), adapter_bytes),
                    (f"{name}.lora_B.weight", (n_out, tr.lora_r), adapter_bytes)]
    if kind == "lora":
        tensors += [(n, dims[n], adapter_bytes) for n, _ in shape.params if n in tr.base]  # modules_to_save copies
    tensors += [(n, tuple(d), adapter_bytes) for n, d in tr.added]
    if deepspeed:
        # DeepSpeed's optimizer works on fp32 copies: master weights (a copy even of fp32 weights) and fp32 states
        state = optimizer_state_bytes(optimizer, [(n, d, 4) for n, d, _ in tensors], opt_settings) + 4 * trainable
    else:
        state = optimizer_state_bytes(optimizer, tensors, opt_settings)
    grad_total = grad_bytes  # one replica's, before ZeRO partitions them
    if zero_stage >= 3 or fsdp2:
        weights /= n_dev
    if zero_stage >= 2 or fsdp2:
        grad_bytes /= n_dev
    if zero_stage >= 1 or fsdp2:
        state /= n_dev
    host: dict[str, int] = {}
    if offload_optimizer:
        host["optimizer"] = int(state)
        host["gradients"] = int(4 * trainable / n_dev)  # ZeRO-Offload's fp32 gradient partition
        state = 0
    if offload_params:
        host["weights"] = int(weights)
        weights = 0

    # ---- the micro-batch
    tokens = batch_size * seq_len if positions is None else positions
    rows = batch_size
    if trained_tokens is None:
        trained_tokens = max(0, tokens - rows)
    if shards_params and loss_chunk > 0:  # the head runs inside the forward for every trained position
        logit_rows, head_in_forward = trained_tokens, True
        path = f"logits for {trained_tokens:,} trained positions (in the forward: parameters are sharded)"
    elif loss_chunk > 0:
        head_in_forward = trained_tokens <= loss_chunk  # else the loss runs the head itself, outside autocast
        # the chunked head runs pieces of at most 32 MiB of fp32 logits (methods/lm.py: chunk_positions)
        piece = min(loss_chunk, max(1, (32 << 20) // (4 * max(shape.vocab, 1))))
        logit_rows = trained_tokens if head_in_forward else min(trained_tokens, piece)
        path = (f"logits for {trained_tokens:,} trained positions" if head_in_forward
                else f"logits in chunks of {piece:,} of {trained_tokens:,} trained positions")
    else:
        logit_rows, head_in_forward = tokens, True
        path = f"full logits for all {tokens:,} positions (loss_chunk 0)"
    masked = attn_mask and attn_impl in ("sdpa", "eager")

    # ---- which layers save what
    embed_trains = any(shape.kind(n) == "embedding" for n in tr.base)
    head_trains = shape.head + ".weight" in tr.base or (shape.tied and embed_trains)
    # tunelab enables input grads when checkpointing a frozen-embedding model (adapters.apply_adapter)
    grad_flows = embed_trains or (grad_ckpt and kind != "full")
    # other adapters: the gradient runs through every layer from the lowest one holding a trained tensor down to
    # it (from the input for soft prompts); their own tensors' saves are not modelled (small next to the layer's)
    first_generic = adapter_params.first_layer() if adapter_params is not None and generic else None
    per_token = 0.0
    per_row = 0.0
    ckpt_inputs = 0.0
    top_layer = _LayerSaves()
    copies_saved = 0.0  # autocast copies autograd keeps until backward (no checkpointing)
    copies_cached = 0.0  # trainable copies held by autocast's cache until the forward ends
    train_norm_layers = {shape.layer_of[n] for n in tr.base if shape.kind(n) == "norm"}
    for i in range(shape.layers):
        norms_train = i in train_norm_layers
        gi = grad_flows or (first_generic is not None and i >= first_generic)
        saves = _layer_saves(_layer_linears(shape, tr, i), shape, gi=gi, norms_train=norms_train,
                             r=tr.lora_r, num=num, attn_impl=attn_impl, masked=masked, seq_len=seq_len,
                             quantization=quantization)
        copies_saved += saves.copies
        copies_cached += saves.cached
        if saves.grad_out and saves.per_token >= top_layer.per_token:
            top_layer = saves
        if grad_ckpt:
            ckpt_inputs += s * shape.hidden if saves.grad_out else 0  # a checkpointed layer keeps only its input
        else:
            per_token += saves.per_token
            per_row += saves.per_row
        grad_flows = grad_flows or saves.grad_out

    # ---- non-layer activations: embedding ids, final norm, the head's input, rotary tables
    final_norm_trains = any(layer_index(n) is None and shape.kind(n) == "norm" for n in tr.base)
    fixed = (8 * tokens if embed_trains else 0) + _norm_saves(grad_flows, final_norm_trains, shape.hidden, num) * tokens
    head_kind = "train" if head_trains else "frozen"
    # cross-entropy saves its int64 targets
    if loss_chunk <= 0:
        extra, share = _consumer_saves(head_kind, s, shape.hidden, num)
        fixed += (extra + (s * shape.hidden if share else 0)) * tokens + 8 * (tokens - rows)
    elif head_in_forward:
        # transformers gathers the kept rows ([n, hidden], a copy); indexing keeps the boolean mask
        extra, share = _consumer_saves(head_kind, s, shape.hidden, num)
        fixed += (extra + (s * shape.hidden if share else 0) + 8) * logit_rows + tokens
    else:
        # the loss gathers the trained rows; the checkpointed chunks keep them and their targets; the model's own
        # (empty) gather keeps its all-false mask
        fixed += (s * shape.hidden + 8) * trained_tokens + 2 * tokens
    fixed += 2 * shape.head_dim * s * (tokens if positions is not None else seq_len)  # cos and sin
    activations = per_token * tokens + per_row * rows + ckpt_inputs * tokens + fixed

    head_copy = (num.c * shape.hidden * shape.vocab
                 if num.autocast and head_in_forward and s != num.c and (head_trains or grad_flows) else 0)
    mask_bytes = rows * seq_len * seq_len * (s if attn_impl == "eager" else 1) if masked else 0

    # ---- logits: the loss's peak is at the start of backward: cross-entropy's saved fp32 log-probabilities, the
    # incoming gradient and the gradient it produces ([rows, vocab] each, fp32) for every position that gets logits
    logits = 3 * 4 * logit_rows * shape.vocab
    logits_fwd = 2 * 4 * logit_rows * shape.vocab  # log-probs + the fp32 logits they came from
    if loss_chunk <= 0:
        logits_fwd = 3 * 4 * logit_rows * shape.vocab  # logits, the shifted fp32 copy and the log-probs
    elif not head_in_forward:
        logits_fwd = 0  # the chunks run after the forward pass, one at a time (counted in the loss moment)
    in_forward_logits = num.c * logit_rows * shape.vocab if num.autocast and head_in_forward else 0

    # ---- backward working set: the residual-stream gradient coming in and the one going out, plus one
    # MLP-width gradient in flight; with checkpointing, the top layer's recomputed activations (and weight copies)
    workset = tokens * (2 * shape.hidden * s + shape.intermediate * num.c)
    recompute = (top_layer.per_token * tokens + top_layer.per_row * rows + top_layer.copies) if grad_ckpt else 0
    head_grads = (sizes.get(shape.head + ".weight", 0) or (shape.vocab * shape.hidden if shape.tied else 0)) \
        * (s if in_place else adapter_bytes) if head_trains else 0
    if zero_stage >= 2 or fsdp2:
        head_grads /= n_dev

    # ---- buffers that persist, and per-moment transients
    persistent_buffers = 0.0
    buf_notes = []
    if not deepspeed and not fsdp2 and n_dev > 1:
        persistent_buffers += grad_total  # DDP's flat gradient buckets (gradient_as_bucket_view off)
        buf_notes.append("DDP gradient buckets")
    fsdp_backward = 0.0
    if fsdp2 and n_dev > 1:
        largest_layer = max(shape.layer_params().values(), default=0)
        root = sum(n for name, n in shape.params if layer_index(name) is None)
        persistent_buffers += (2 * largest_layer + root) * s
        buf_notes.append("FSDP2 gathered parameters (the root: embeddings, head, norm; current + prefetched layer)")
        fsdp_backward = largest_layer * s  # a layer's whole gradient before its reduce-scatter
    if deepspeed:
        sized = {k.rsplit(".", 1)[1]: v for k, v in bucket_sizes(shape.hidden).items()}
        bucket_elems = sized["reduce_bucket_size"] if bucket_elems is None else bucket_elems
        prefetch_elems = sized["stage3_prefetch_bucket_size"] if prefetch_elems is None else prefetch_elems
        live_elems = sized["stage3_max_live_parameters"] if live_elems is None else live_elems
        persistent_buffers += min(bucket_elems, trainable) * s
        buf_notes.append("ZeRO gradient bucket")
        if zero_stage == 3:
            largest_layer = max(shape.layer_params().values(), default=0)
            largest_other = max((n for name, n in shape.params if layer_index(name) is None), default=0)
            # the layer in use and what is prefetched, at most the live-parameter limit (but a whole layer)
            ahead = min(shape.total, largest_layer + max(largest_layer, prefetch_elems),
                        max(largest_layer, live_elems))
            persistent_buffers += max(ahead, largest_other) * s
            buf_notes.append("ZeRO-3 gathered parameters (the layer in use + its prefetch bucket)")
    if quantized:
        # bitsandbytes multiplies by one dequantized weight at a time (4-bit, and int8's CPU training path)
        biggest = max((i * o for name, i, o in shape.linears if name in quant_linears), default=0)
        persistent_buffers += biggest * num.c
        buf_notes.append(f"one dequantized {quantization} weight")
    if deepspeed:
        # the step converts this rank's gradient partition to fp32 (ZeRO-3: one sub-group of 1e9 elements at a
        # time), a copy unless it is fp32 already; the fused AdamW on CPU allocates nothing more
        partition = trainable / n_dev if zero_stage < 3 else min(trainable / n_dev, DEEPSPEED_SUB_GROUP_ELEMS)
        step_temp = 0 if offload_optimizer or s >= 4 else 4 * partition
        if not cpu and not offload_optimizer:
            step_temp += _step_temp(optimizer, [("partition", (int(partition),), 4)], cpu=cpu, settings=opt_settings)
    else:
        step_temp = _step_temp(optimizer, tensors, cpu=cpu, settings=opt_settings) / (n_dev if fsdp2 else 1)

    runtime = runtime_bytes
    if runtime is None:
        peft = CPU_PEFT_RUNTIME_BYTES if peft_backed(kind) else 0
        runtime = CPU_RUNTIME_BYTES + peft if cpu else CUDA_RUNTIME_BYTES
    dataset = dataset_tokens * DATASET_BYTES_PER_TOKEN if cpu else 0
    accum_grads = grad_bytes if grad_accum > 1 else 0  # earlier micro-batches' gradients stay during forward

    frozen_total = sum(b for _, b in frozen_models)
    base = {"runtime": runtime + dataset, "weights": weights, "frozen_models": frozen_total, "optimizer": state}
    # online RL samples before each step's forward: the KV cache of every sequence sampled at once (keys and values
    # of every layer, in the compute dtype) and one position's fp32 logits, softmax and float64 CDF per sequence
    rollout_seqs, rollout_tokens = rollout
    kv_bytes = 2 * shape.layers * shape.kv_heads * shape.head_dim * rollout_seqs * rollout_tokens * num.c
    moments: dict[str, dict[str, float]] = {
        "forward": {**base, "weight_copies": (copies_cached if grad_ckpt else copies_saved) + head_copy,
                    "gradients": accum_grads, "activations": activations,
                    "logits": max(logits_fwd, in_forward_logits), "buffers": persistent_buffers + mask_bytes},
        "loss": {**base, "weight_copies": (0 if grad_ckpt else copies_saved) + head_copy,
                 "gradients": accum_grads, "activations": activations, "logits": logits,
                 "buffers": persistent_buffers + mask_bytes},
        "backward": {**base, "weight_copies": 0 if grad_ckpt else copies_saved,
                     "gradients": max(accum_grads, head_grads), "activations": activations + recompute,
                     "logits": 0, "buffers": persistent_buffers + mask_bytes + workset + fsdp_backward},
        "optimizer": {**base, "weight_copies": 0, "gradients": grad_bytes, "activations": 0, "logits": 0,
                      "buffers": persistent_buffers + step_temp},
    }
    merged_bytes = 0
    if rollout_seqs and rollout_merged and kind == "lora" and quantization == "none":
        from tunelab.engine.plan.trainable import _lora_targets

        merged_bytes = sum(i * o for _, i, o in _lora_targets(shape, lora_targets)) * s_store
    if rollout_seqs:
        moments["rollout"] = {**base, "rollout_cache": kv_bytes, "weight_copies": copies_cached + head_copy
                              + merged_bytes,
                              "gradients": 0, "activations": 0, "logits": rollout_seqs * shape.vocab * (4 + 4 + 8),
                              "buffers": persistent_buffers}
    trained_notes = []
    for what, trained_shape in trained_models:
        sub = estimate(trained_shape, adapter="full", precision=precision, storage_dtype=storage_dtype,
                       batch_size=batch_size, seq_len=seq_len, grad_ckpt=grad_ckpt, loss_chunk=loss_chunk,
                       zero_stage=zero_stage, offload_optimizer=offload_optimizer, offload_params=offload_params,
                       devices=devices, fsdp2=fsdp2, bucket_elems=bucket_elems, prefetch_elems=prefetch_elems,
                       live_elems=live_elems,
                       optimizer=optimizer, device=device, attn_impl=attn_impl,
                       attn_mask=attn_mask,
                       positions=positions, trained_tokens=trained_tokens, grad_accum=grad_accum, runtime_bytes=0,
                       optimizer_settings=optimizer_settings)
        resident = {c: v for c, v in sub.moments["forward"].items() if c in ("weights", "optimizer")}
        for moment, parts in moments.items():
            own = sub.moments.get(moment, resident)
            parts["trained_models"] = parts.get("trained_models", 0) + sum(
                v for c, v in own.items() if c not in ("runtime", "logits"))
        trained_notes.append(f"{what}: {_fmt_count(sub.params)} params trained in full ({optimizer})")
    moments_int = {k: {c: int(v.get(c, 0)) for c in COMPONENTS} for k, v in moments.items()}
    totals = {k: sum(v.values()) for k, v in moments_int.items()}
    peak = max(totals, key=lambda k: totals[k])
    components = dict(moments_int[peak])

    # ---- what each component is made of (for the table)
    n_total = sum(n for _, n in shape.params) + n_extra \
        + (adapter_params.added_frozen_params if adapter_params is not None and generic else 0)
    if kind == "full":
        weight_note = f"{_fmt_count(shape.total)} params x {s} B"
    elif kind == "freeze":
        weight_note = f"{_fmt_count(shape.total)} params x {s} B ({_fmt_count(trainable_base)} of them train)"
    else:
        weight_note = (f"decoder linear weights {_quant_note(quantization, double_quant)}, other base params "
                       f"x {s} B" if quantized else f"{_fmt_count(shape.total)} base params x {s} B")
        weight_note += f" + {_fmt_count(n_extra)} adapter params x {adapter_bytes} B"
        if added_frozen:
            weight_note += f" + {_fmt_count(added_frozen)} frozen adapter tensors x {adapter_bytes} B"
        if trainable_base:
            weight_note += f" ({_fmt_count(trainable_base)} base params train in place)"
    if zero_stage >= 3 or fsdp2:
        weight_note += f", / {n_dev} devices ({'FSDP2' if fsdp2 else 'ZeRO-3'})"
    if offload_params:
        weight_note = "offloaded to host memory (ZeRO-3 parameter offload)"
    state_note = f"{optimizer}{_optimizer_detail(optimizer, opt_settings)}: {OPTIMIZERS.get(optimizer, '')} for " \
        f"{_fmt_count(trainable)} trainable params"
    if deepspeed:
        state_note = f"{optimizer} states in fp32 + fp32 master weights for {_fmt_count(trainable)} trainable params"
    if zero_stage >= 1:
        state_note += f", / {n_dev} devices (ZeRO-{zero_stage})"
    if fsdp2:
        state_note += f", / {n_dev} devices (FSDP2)"
    if offload_optimizer:
        state_note = "offloaded to host memory (ZeRO optimizer offload)"
    grads_note = {
        "rollout": "none (set to None after the previous step)",
        "forward": "earlier micro-batches' gradients (grad_accum > 1)" if accum_grads else "none yet (set to None)",
        "loss": "earlier micro-batches' gradients (grad_accum > 1)" if accum_grads else "none yet (set to None)",
        "backward": "the output layer's gradient, computed first" if head_grads >= accum_grads and head_grads
        else ("accumulated gradients" if accum_grads else "none yet"),
        "optimizer": (f"{_fmt_count(trainable)} trainable params x {param_bytes} B"
                      if not (trainable_base and n_extra) else
                      f"{_fmt_count(trainable_base)} base params x {s} B + {_fmt_count(n_extra)} adapter "
                      f"params x {adapter_bytes} B")
        + (f", / {n_dev} devices (ZeRO-{zero_stage})" if zero_stage >= 2 else "")
        + (f", / {n_dev} devices (FSDP2)" if fsdp2 else ""),
    }[peak]
    act_note = (f"saved for backward: {_fmt_count(tokens)} positions x "
                + (f"{shape.layers} checkpointed layer inputs x {s} B x hidden" if grad_ckpt
                   else f"{per_token / 1024:.1f} KiB/position over {shape.layers} layers")
                + (f" + attention masks {_fmt_bytes(per_row * rows)}" if per_row else ""))
    if peak == "backward" and grad_ckpt:
        act_note += f" + the top layer recomputed ({_fmt_bytes(recompute)})"
    if generic:
        act_note += (f"; {kind}: the base layers' saves from layer {first_generic} up (the gradient passes through "
                     "them to the adapter), the adapter's own tensors not counted"
                     if first_generic is not None else f"; {kind}: nothing trains")
        if kind in WIDE_BRANCH_ADAPTERS:
            act_note += " (its branches save layer-wide tensors: expect more)"
        if virtual > 0:
            act_note += f", {virtual} soft-prompt positions per row included"
        if kind == "prefix":
            act_note += ", the prefixes' extra keys/values not counted"
    copies_note = ("autocast's compute-dtype copies of fp32 weights"
                   + (" (cached for the whole forward)" if peak == "forward" and grad_ckpt else "")
                   if components["weight_copies"] else "none (weights already in the compute dtype)")
    if peak == "rollout" and merged_bytes:
        copies_note = (copies_note if components["weight_copies"] > merged_bytes else "") + \
            (" + " if components["weight_copies"] > merged_bytes else "") + \
            "a merged copy of every adapted LoRA weight while sampling (method.merge_adapter)"
    logits_note = {
        "rollout": f"sampling: one position's fp32 logits, probabilities and float64 CDF for {rollout_seqs} sequences",
        "forward": "fp32 logits and log-probabilities" if logits_fwd >= in_forward_logits
        else "compute-dtype logits inside the forward",
        "loss": f"{path}: fp32 log-probs + 2 gradients, {_fmt_count(logit_rows)} x {_fmt_count(shape.vocab)} vocab "
                "x 4 B x 3",
        "backward": "freed",
        "optimizer": "freed",
    }[peak]
    buf_parts = list(buf_notes)
    if peak != "optimizer" and mask_bytes:
        buf_parts.append("attention mask")
    if peak == "backward":
        buf_parts.append("backward working set (residual gradients in and out + one MLP-width gradient)")
    if peak == "optimizer" and step_temp:
        buf_parts.append("optimizer step temporaries")
    if cpu:
        runtime_note = ("Python, torch, transformers and peft, a tokenizer and the data (baseline RSS "
                        + ("calibrated on this machine)" if runtime_bytes is not None else "of the reference machine; "
                           "`tunelab plan --calibrate` measures it here)"))
    else:
        runtime_note = "CUDA context, library workspaces and allocator slack (estimate)"
    if dataset:
        runtime_note += f" + tokenized dataset ({_fmt_count(dataset_tokens)} tokens)"
    notes = {
        "runtime": runtime_note,
        "weights": weight_note,
        "weight_copies": copies_note,
        "gradients": grads_note,
        "optimizer": state_note,
        "activations": act_note if components["activations"] else "freed",
        "logits": logits_note,
        "buffers": ", ".join(buf_parts) or "none",
        "frozen_models": "; ".join(what for what, _ in frozen_models) or "none",
        "trained_models": "; ".join(trained_notes) + " (weights, optimizer state, gradients and activations at this "
                          "moment)" if trained_notes else "none",
        "rollout_cache": (f"KV cache: {rollout_seqs} sequences x {rollout_tokens} tokens x {shape.layers} layers x "
                          f"2 x {shape.kv_heads} heads x {shape.head_dim} x {num.c} B" if kv_bytes
                          else "none"),
    }
    inputs = dict(adapter=adapter, lora_r=lora_r, lora_targets=lora_targets if isinstance(lora_targets, str)
                  else list(lora_targets), trainable_layers=trainable_layers,
                  trainable_modules=list(trainable_modules), precision=precision, storage_dtype=storage_dtype,
                  batch_size=batch_size, seq_len=seq_len, positions=tokens, trained_tokens=trained_tokens,
                  grad_ckpt=grad_ckpt, loss_chunk=loss_chunk, loss_path=path, zero_stage=zero_stage,
                  offload_optimizer=offload_optimizer, offload_params=offload_params, devices=devices, fsdp2=fsdp2,
                  optimizer=optimizer, device=device, attn_impl=attn_impl, attn_mask=masked, grad_accum=grad_accum,
                  runtime=runtime, quantization=quantization, double_quant=double_quant,
                  optimizer_settings=dict(momentum=opt_settings.momentum, galore_rank=opt_settings.galore_rank,
                                          galore_target=list(opt_settings.galore_target)),
                  adapter_params=None if adapter_params is None else dict(
                      trained_base=len(adapter_params.trained_base), added=adapter_params.added_params,
                      added_frozen=adapter_params.added_frozen, virtual_tokens=adapter_params.virtual_tokens),
                  frozen_models=[[what, int(b)] for what, b in frozen_models],
                  trained_models=[what for what, _ in trained_models])
    return MemoryPlan(components=components, notes=notes, phase=peak, phases=totals, moments=moments_int, host=host,
                      params=n_total, trainable=trainable, inputs=inputs)


def max_batch_size(shape: ModelShape, budget_bytes: float, *, limit: int = 1 << 16, **kwargs: Any) -> int:
    """The largest micro-batch (rows) whose predicted peak fits in `budget_bytes`; 0 if even one row does not.
    `kwargs` are estimate()'s, without batch_size; memory grows with the batch, so a bisection finds it."""
    kwargs.pop("positions", None)
    kwargs.pop("trained_tokens", None)

    def fits(b: int) -> bool:
        return estimate(shape, batch_size=b, **kwargs).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
