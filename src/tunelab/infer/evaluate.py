"""`tunelab eval ppl`: perplexity on the trained tokens of a dataset, with the model's size and speed.

The yardstick of compression (docs/compression.md): the same number a training run's evaluation reports
(`eval_ppl`: exp of the mean next-token NLL over the tokens sft or pt would train), beside what compression
changes: the parameters (and how many are zero: sparsity), the size of the weights on disk, and the speed of
inference on this machine, both the forward pass over the evaluation rows (prefill, tokens/s) and greedy decoding
with the KV cache (generated tokens/s).

Rows are read and tokenized as training reads them (data kind chat: the assistant turns are scored; text: every
token), sorted by length and scored in padded batches; the NLL sums run in float64.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class PerplexityReport:
    model: str
    adapter: list[str]
    kind: str
    rows: int
    tokens: int  # scored (trained) tokens
    nll: float  # mean per scored token
    ppl: float
    parameters: int
    nonzero: int
    disk_bytes: int
    forward_tokens_per_s: float
    generate_tokens_per_s: float
    batch_size: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / max(self.parameters, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity}

    def text(self) -> str:
        adapter = f" + {', '.join(self.adapter)}" if self.adapter else ""
        return "\n".join([
            f"eval ppl: {self.model}{adapter}",
            f"  data: {self.rows} rows, {self.tokens:,} scored tokens ({self.kind})",
            f"  perplexity: {self.ppl:.4f} (nll {self.nll:.4f} per token)",
            f"  parameters: {self.parameters:,} ({self.nonzero:,} nonzero, sparsity {100 * self.sparsity:.1f}%)",
            f"  size on disk: {self.disk_bytes / 2 ** 20:,.2f} MiB",
            f"  speed: forward {self.forward_tokens_per_s:,.0f} tokens/s (batch {self.batch_size}), generation "
            f"{self.generate_tokens_per_s:,.1f} tokens/s (greedy, batch 4)",
        ])


def disk_bytes(*folders: str) -> int:
    """The size of the weight files of model and adapter folders."""
    total = 0
    for folder in folders:
        for path in Path(folder).iterdir():
            if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
                total += path.stat().st_size
    return total


def count_parameters(model) -> tuple[int, int]:
    """(parameters, nonzero ones) of a model as it computes: a quantized layer counts the weights it stands for."""
    from tunelab.models.quant import stored_weight_count

    total = nonzero = 0
    for module in model.modules():
        counted = stored_weight_count(module)
        if counted is not None:
            total += counted[0]
            nonzero += counted[1]
            params = [p for n, p in module.named_parameters(recurse=False) if not n.startswith("weight")]
        else:
            params = list(module.parameters(recurse=False))
        for p in params:
            total += p.numel()
            nonzero += int((p != 0).sum())
    return total, nonzero


def _decode_speed(model, rows, tokenizer, device, new_tokens: int = 32) -> float:
    """Greedy tokens/s of up to 4 sequences decoded together after their first 32 tokens (KV cache)."""
    from tunelab.methods.sampling import SamplingOptions, sample

    prompts = [list(r.input_ids[:32]) for r in rows[:4] if len(r.input_ids) > 1]
    if not prompts:
        return 0.0
    opts = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0)
    sample(model, [p[:4] for p in prompts], [0] * len(prompts), SamplingOptions(max_new_tokens=2, temperature=0.0),
           stop_ids=[], pad_id=tokenizer.pad_token_id, device=device)  # warm-up
    t0 = time.perf_counter()
    out, _ = sample(model, prompts, [0] * len(prompts), opts, stop_ids=[], pad_id=tokenizer.pad_token_id,
                    device=device)
    return sum(len(o) for o in out) / (time.perf_counter() - t0)


def evaluate_perplexity(*, model: str, adapter: list[str], cfg, kind: str, batch_size: int = 8,
                        allow_pickle: bool = False, trust_remote_code: bool = False) -> PerplexityReport:
    import torch

    from tunelab.data.kinds import get_kind
    from tunelab.data.load import load_conversations
    from tunelab.data.prepare import encode_rows
    from tunelab.data.templates import resolve_template
    from tunelab.infer.loading import load_for_inference, mergeable_folder
    from tunelab.methods.lm import trained_logprobs

    if batch_size < 1:
        raise UserError(f"eval ppl: --batch-size must be >= 1, got {batch_size}")
    data_kind = get_kind(kind)
    convs, _ = load_conversations(cfg.data.train, on_bad_row=cfg.data.on_bad_row, kind=data_kind,
                                  replace=cfg.data.replace)
    from tunelab.models.record import sparsity_record

    # merged for speed, unless that would fill a pruned base's zeros (its sparsity is what is measured)
    merge = bool(adapter) and all(mergeable_folder(a) for a in adapter) and sparsity_record(model) is None
    net, tok = load_for_inference(model, adapter or None, merge=merge, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code)
    template = resolve_template(cfg.data.template, tok)
    rows, _ = encode_rows(convs, tok, template, cfg.data, data_kind)
    if not rows:
        raise UserError("eval ppl: no row of the data has a token to score (after truncation to data.max_length)")
    device = next(net.parameters()).device
    order = sorted(rows, key=lambda r: len(r.input_ids))
    nll, tokens, positions, seconds = 0.0, 0, 0, 0.0
    with torch.no_grad():
        warm = order[-min(batch_size, len(order)):]  # one untimed pass: first-call allocations and kernel choice
        trained_logprobs(net, {k: v.to(device) for k, v in
                               data_kind.batch(warm, "none", tok.pad_token_id, cfg.data.max_length).items()})
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in
                     data_kind.batch(chunk, "none", tok.pad_token_id, cfg.data.max_length).items()}
            t0 = time.perf_counter()
            logps, _ = trained_logprobs(net, batch)
            seconds += time.perf_counter() - t0
            nll -= float(logps.double().sum())
            tokens += int(logps.numel())
            positions += sum(len(r.input_ids) for r in chunk)
        generate = _decode_speed(net, rows, tok, device)
    mean = nll / max(tokens, 1)
    total, nonzero = count_parameters(net)
    return PerplexityReport(model=model, adapter=list(adapter), kind=data_kind.name, rows=len(rows), tokens=tokens,
                            nll=mean, ppl=math.exp(min(mean, 50.0)), parameters=total, nonzero=nonzero,
                            disk_bytes=disk_bytes(model, *adapter), forward_tokens_per_s=positions / max(seconds, 1e-9),
                            generate_tokens_per_s=generate, batch_size=batch_size)
