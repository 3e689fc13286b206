"""A checkpoint as the standard folder RUN/final would hold had the run ended there.

A ddp checkpoint keeps the trained weights in weights/ in the form a resumed run loads (PiSSA/OLoRA unconverted,
AdaLoRA at full rank, no tokenizer); a sharded one (zero1-3, fsdp2) keeps every rank's share of whole tensors in
shards/ (engine/checkpoint.py). `write_checkpoint_folder` rebuilds the model and adapter the way the run did,
from the config the checkpoint was written with, loads the checkpoint's trained tensors into it and saves what the
final save writes: a whole HF folder (full, freeze) or the adapter, with the tokenizer and the chat template. It
runs in one process, with no process group: the shards hold whole tensors, so gathering them is reading every
file. `tunelab export --checkpoint` uses it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.engine import checkpoint as ckpt_io
from tunelab.errors import UserError

POLICY = "param/policy/"  # the policy's trained tensors in a sharded checkpoint (engines.save_shards)


def write_checkpoint_folder(ckpt: Path, dest: Path) -> None:
    """Write into `dest` (created) what RUN/final would hold had the run stopped at checkpoint `ckpt`. Modules
    that trained beside the policy (a critic) are not written: the policy is what is exported."""
    from tunelab.config import load_config
    from tunelab.data.templates import resolve_template
    from tunelab.engine.loop import load_weights, save_weights
    from tunelab.engine.shape import resolve_run
    from tunelab.models import quant
    from tunelab.models.adapters import AdapterSetup, apply_adapter, is_peft, unwrap
    from tunelab.models.load import load_model, load_tokenizer
    from tunelab.utils.env import quiet_transformers

    ckpt = Path(ckpt)
    if not (ckpt / "state.json").is_file() or not (ckpt / "config.yaml").is_file():
        raise UserError(f"--checkpoint: {ckpt} is not a complete tunelab checkpoint (no state.json or config.yaml)")
    sharded = bool(ckpt_io.shard_files(ckpt))
    try:
        if sharded:
            ckpt_io.check_shards(ckpt)
        state = ckpt_io.read_state(ckpt)
    except ckpt_io.DamagedCheckpoint as e:
        raise UserError(f"--checkpoint: {e}") from None
    cfg = load_config(ckpt / "config.yaml")
    shape = resolve_run(cfg)
    tokenizer = load_tokenizer(cfg.model)
    with quiet_transformers():
        model = load_model(cfg.model, dtype=shape.torch_dtype, head=shape.method.head,
                           pad_token_id=tokenizer.pad_token_id)
    model = quant.prepare_for_training(model, cfg.model, False)
    run_dir = ckpt.parent.parent  # RUN/checkpoints/checkpoint-N
    setup = AdapterSetup(total_steps=state.total_steps, model_path=cfg.model.path,
                         tokenizer_path=cfg.model.tokenizer or cfg.model.path, resuming=True)
    model = apply_adapter(model, cfg.adapter, setup)
    if sharded:
        _load_policy_shards(unwrap(model), ckpt)
    else:
        load_weights(model, ckpt)
    template = resolve_template(cfg.data.template, tokenizer)
    if not is_peft(model) and getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = template.stop_token_ids(tokenizer)
    quantized = quant.describe(cfg.model)
    save_weights(model, dest, tokenizer, template, final=True, output_dir=run_dir,
                 base_info={"quantization": quantized} if quantized else None)


def _load_policy_shards(model: torch.nn.Module, ckpt: Path) -> None:
    """Copy every trained tensor of the policy from the shard files into `model` (its names are the ones the
    run's engine saved: the unwrapped model's named_parameters)."""
    from safetensors import safe_open

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    found: set[str] = set()
    with torch.no_grad():
        for f in ckpt_io.shard_files(ckpt):
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if not key.startswith(POLICY):
                        continue
                    name = key[len(POLICY):]
                    p = params.get(name)
                    if p is None:
                        raise UserError(f"{f}: holds {name}, which the model rebuilt from the checkpoint's config "
                                        "does not train (written for another model or adapter)")
                    t = handle.get_tensor(key)
                    if tuple(t.shape) != tuple(p.shape):
                        raise UserError(f"{f}: {name} has shape {tuple(t.shape)}, the rebuilt model's "
                                        f"{tuple(p.shape)} (an adapter whose shape came from its training data, "
                                        "such as EVA's redistributed ranks, cannot be rebuilt: use RUN/final)")
                    p.copy_(t.to(p.dtype))
                    found.add(name)
    missing = sorted(set(params) - found)
    if missing:
        raise UserError(f"{ckpt}: the checkpoint lacks trained tensor {missing[0]} (written for another model or "
                        "adapter)")
