"""One resolved run shape: what a config means for the loop, decided once.

`resolve_run(cfg)` answers what the loop, `tunelab bench` and `tunelab plan` each used to work out for themselves:
the method and the data kinds it reads and batches, the batching mode (data.packing with auto resolved by what the
method, its data kind and the adapter allow), how many sequences a row is, the compute precision and the weights'
dtype on the target device, and the frozen models the method asks for (`Method.models`), with which of them stay in
memory while training. The loop then checks one thing only the loaded model can tell: whether it keeps packed
sequences apart (engine/packing.py); under data.packing=auto a model that does not falls back to none.
`measure_sequences` tokenizes a config's data into the sequences the loop batches, for `bench` and `plan --measure-data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.config.schema import Config
from tunelab.data.kinds import DataKind, get_kind
from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods.base import ExtraModel, Method
from tunelab.models.adapters import ADAPTERS, AdapterKind
from tunelab.utils.hardware import cpu_has_native_bf16

# model.dtype names -> the short names reports use
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


@dataclass(frozen=True)
class RunShape:
    method: Method
    data_kind: DataKind  # the rows read from the datasets
    kind: DataKind  # the rows micro-batches are built from (what a rollout returns, else data_kind)
    adapter: AdapterKind
    device: str  # cuda | cpu: the device the run trains on
    precision: str  # fp32 | bf16 | fp16: the compute precision (autocast under mixed precision)
    dtype: str  # fp32 | bf16 | fp16 | fp64: what the base model's weights are loaded in
    packing: str  # none | group_by_length | padding_free: data.packing, auto resolved
    packing_requested: str  # data.packing as configured
    batch_size: int  # rows per micro-batch
    extra_models: dict[str, ExtraModel] = field(default_factory=dict)  # the method's frozen models, by role
    quantized: bool = False  # a bitsandbytes base: its unquantized parameters are upcast to fp32 for training
    steps_per_rollout: int = 1  # optimizer steps that train on one rollout (Method.rollout_steps)
    grad_accum: int = 1
    rollout_rows: int = 0  # a rollout method's trainable rows per prompt row (its group); 0: no rollout
    rollout_tokens: int = 0  # the longest rolled-out sequence (prompt + completion)
    rollout_merged: bool = False  # sampling holds a merged copy of the adapted LoRA weights (Method.rollout_merges)

    @property
    def rolls_out(self) -> bool:
        """The method rolls out its global batches in this run: it has a rollout, and a method whose options
        choose whether it samples (kd's lmbda) says so through Method.rollout_shape (0 rows: none)."""
        return self.method.rollout is not None and (self.method.rollout_shape is None or self.rollout_rows > 0)

    @property
    def sequences_per_row(self) -> int:
        """Sequences a micro-batch holds per row of train.batch_size: a pair is two, a prompt its group."""
        return self.kind.sequences_per_row * max(self.rollout_rows, 1)

    @property
    def rollout_memory(self) -> tuple[int, int]:
        """(sequences a process samples at once: its prompts of the global batch x the group, tokens each)."""
        if not self.rollout_rows:
            return 0, 0
        return self.batch_size * self.grad_accum * self.rollout_rows, self.rollout_tokens

    @property
    def sequences_per_micro_batch(self) -> int:
        return self.batch_size * self.sequences_per_row

    @property
    def mixed_precision(self) -> str:
        """accelerate's mixed_precision: no (fp32 compute), bf16 or fp16."""
        return "no" if self.precision == "fp32" else self.precision

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, TORCH_DTYPES[self.dtype])

    @property
    def storage(self) -> str:
        """The dtype the base's non-quantized parameters train in (quant.prepare_for_training upcasts them)."""
        return "fp32" if self.quantized else self.dtype

    @property
    def compute_dtype(self) -> str:
        """The dtype the matmuls run in: the autocast dtype under mixed precision, else the weights' dtype."""
        return TORCH_DTYPES[self.precision if self.precision != "fp32" else self.dtype]

    def resident_models(self) -> dict[str, ExtraModel]:
        """The frozen models that take memory of their own while training: copies and other folders (the policy
        with its adapter disabled takes none; a model used only before training is gone by the first step)."""
        return {role: m for role, m in self.extra_models.items()
                if m.during_training and m.source != "adapter_off" and not m.trainable}

    def trained_models(self) -> dict[str, ExtraModel]:
        """The models that train beside the policy (a critic): weights, gradients and optimizer state of their own."""
        return {role: m for role, m in self.extra_models.items() if m.trainable}


def resolve_precision(requested: str, device: str, *, check_hardware: bool = True) -> str:
    """train.precision for `device`. check_hardware (training here): refuse what this machine cannot do well, and
    ask CUDA whether it has bf16; planning for another machine assumes a CUDA target has it."""
    import torch

    if requested == "auto":
        if device != "cuda":
            return "fp32"
        return "bf16" if not check_hardware or torch.cuda.is_bf16_supported() else "fp16"
    if check_hardware and requested == "bf16" and device != "cuda" and not cpu_has_native_bf16():
        raise UserError(
            "train.precision: bf16 on this CPU has no native support and runs ~26x slower than fp32; "
            "use train.precision=fp32 (or auto)"
        )
    if check_hardware and requested == "fp16" and device != "cuda":
        raise UserError("train.precision: fp16 mixed precision needs a CUDA GPU; use fp32 (or auto) on CPU")
    return requested


def resolve_weights_dtype(requested: str, *, trains_base: bool, device: str, check_hardware: bool = True) -> str:
    """model.dtype: auto is fp32 on CPU (no native half precision there); on CUDA, bf16 for frozen bases
    (LoRA/freeze keep fp32 trainable copies) and fp32 master weights for full fine-tuning (autocast does the bf16
    compute)."""
    if requested != "auto":
        return SHORT_DTYPES.get(requested, requested)
    if device == "cuda" and not trains_base:
        if check_hardware:
            import torch

            if not torch.cuda.is_bf16_supported():
                return "fp32"
        return "bf16"
    return "fp32"


def resolve_packing(cfg: Config, method: Method, kind: DataKind, adapter: AdapterKind) -> str:
    """data.packing with auto resolved: padding_free where the method, its data kind and the adapter allow it
    (the loop still checks the loaded model); padding_free where they do not is refused."""
    packing = cfg.data.packing
    if packing not in ("auto", "padding_free"):
        return packing
    # pairs scored by log-probabilities pack like sft rows (sequence_ids keep the answers apart); a score head
    # (rm) reads one position per row, and a kind without a packed collator (kto, prompts) is built per row
    if not (method.packs and kind.pack is not None):
        if packing == "padding_free":
            raise UserError(f"data.packing: padding_free cannot be used with method {cfg.method.type}, which "
                            "scores each row as one sequence: use data.packing=group_by_length or none")
        return "none"
    if not adapter.packs:
        if packing == "padding_free":
            raise UserError(f"data.packing: padding_free cannot be used with adapter {cfg.adapter.type}, which "
                            "needs each row's own positions; use data.packing=group_by_length or none")
        return "none"
    return "padding_free"


def resolve_run(cfg: Config, *, device: str | None = None, check_hardware: bool | None = None) -> RunShape:
    """The run `cfg` describes on `device` (default: this machine's; check_hardware defaults to planning for
    this machine, where what it cannot do well is refused)."""
    import torch

    local = "cuda" if torch.cuda.is_available() else "cpu"
    device = device or local
    check = (device == local) if check_hardware is None else check_hardware
    method = METHODS[cfg.method.type]
    data_kind, kind = map(get_kind, method.kinds(cfg))
    adapter = ADAPTERS[cfg.adapter.type]
    return RunShape(
        method=method, data_kind=data_kind, kind=kind, adapter=adapter, device=device,
        precision=resolve_precision(cfg.train.precision, device, check_hardware=check),
        dtype=resolve_weights_dtype(cfg.model.dtype, trains_base=adapter.trains_base, device=device,
                                    check_hardware=check),
        packing=resolve_packing(cfg, method, kind, adapter), packing_requested=cfg.data.packing,
        batch_size=cfg.train.batch_size, extra_models=method.extra_models(cfg),
        quantized=cfg.model.quantization != "none",
        steps_per_rollout=method.rollout_steps(cfg) if method.rollout_steps is not None else 1,
        grad_accum=cfg.train.grad_accum,
        rollout_rows=method.rollout_shape(cfg)[0] if method.rollout_shape is not None else 0,
        rollout_tokens=method.rollout_shape(cfg)[1] if method.rollout_shape is not None else 0,
        rollout_merged=method.rollout_merges(cfg, device) if method.rollout_merges is not None else False)


@dataclass
class SequenceStats:
    """The token sequences of a config's data as the loop batches them (a preference pair is two)."""

    lengths: list[int]  # tokens of each training sequence
    trained: list[int]  # its loss targets (the first position never is one: labels shift inside the loss)
    val_tokens: int  # tokens of the validation sequences


def measure_sequences(cfg: Config) -> SequenceStats:
    """Tokenize the config's data (through the tokenization cache, so after a run this is a cache read)."""
    from tunelab.data.collate import sequences
    from tunelab.data.prepare import prepare_data
    from tunelab.data.tokenize import IGNORE_INDEX
    from tunelab.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    shape = resolve_run(cfg, check_hardware=False)
    data = prepare_data(cfg.data, tokenizer, kind=shape.data_kind, seed=cfg.train.seed)
    train = sequences(data.train)
    return SequenceStats([len(r.input_ids) for r in train],
                         [sum(1 for x in getattr(r, "labels", ())[1:] if x != IGNORE_INDEX) for r in train],
                         sum(len(r.input_ids) for r in sequences(data.val)))
