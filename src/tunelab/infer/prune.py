"""`tunelab prune`: unstructured, N:M and structured pruning of a model folder (docs/compression.md).

Unstructured and N:M (the linear layers of every decoder layer; embeddings and the LM head stay dense):

- magnitude: the weights of smallest |W| in each layer are set to zero, the target share of the layer;
- wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"): the score of W_ij is |W_ij| times
  the L2 norm of input feature j over the calibration tokens, and each output row keeps its highest-scored weights
  (the paper's per-output comparison); calibrated sequentially, each layer on the inputs the already pruned layers
  before it give (infer/calibration.py);
- `pattern: N:M` (2:4: NVIDIA's sparse tensor cores) keeps the N best-scored of every M consecutive inputs of a row,
  with either score; the sparsity is then 1 - N/M.

The pruned weights are stored as zeros in a standard dense HF folder (loadable by any runtime; the size on disk does
not change, a sparse kernel is what turns 2:4 into speed), with `tunelab_compression.json` recording what was
done. A LoRA trained on it for recovery keeps the base's zeros (the base is frozen); merging the adapter would fill
them, so `tunelab export` refuses to merge into a pruned base unless asked to re-apply its zeros
(`--keep-sparsity`: the merged weights are masked with the base's pattern, a small change of the adapted model,
which eval ppl measures).

Structured (a smaller dense model, config updated, loadable by `AutoModelForCausalLM.from_pretrained`):

- layers: drop the decoder layers that change the hidden state least on the calibration data (ShortGPT's block
  influence, 1 - the mean cosine similarity of a layer's input and output hidden states);
- width: shrink every MLP's intermediate width and/or every attention layer's heads by the same share, keeping the
  neurons (heads) of highest activation-weighted importance: for MLP neuron j, ||a_j|| x ||W_down[:, j]|| (a_j its
  activation over the calibration tokens), for a key-value head group the sum of that over its query heads' input
  columns of o_proj. Whole key-value groups go, so grouped-query attention keeps its ratio; head_dim is kept (and
  written to the config explicitly).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tunelab.errors import UserError
from tunelab.models.record import RECORD, UNSTRUCTURED, record_text

STRUCTURED = ("layers", "width")
PRUNE_METHODS = UNSTRUCTURED + STRUCTURED


# ---------------------------------------------------------------------------------------------- the math (pure)
def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise UserError(f"--pattern: unstructured or N:M (2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise UserError(f"--pattern: N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of a whole layer: the floor(sparsity x numel) lowest scores pruned (ties: the earlier index)."""
    k = int(math.floor(sparsity * score.numel()))
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        order = torch.argsort(score.flatten().double(), stable=True)
        keep[order[:k]] = False
    return keep.view_as(score)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask per output row: each row's floor(sparsity x in_features) lowest scores pruned."""
    k = int(math.floor(sparsity * score.shape[1]))
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        order = torch.argsort(score.double(), dim=1, stable=True)
        keep.scatter_(1, order[:, :k], False)
    return keep


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the n highest scores of every m consecutive inputs of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{cols} inputs are not a multiple of {m}")
    groups = score.double().reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.reshape(rows, cols)


def wanda_score(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| x ||X_j||_2 from the sum of squares of each input feature over the calibration tokens."""
    return weight.abs().double() * input_sq_sum.double().sqrt()[None, :]


def block_influence(cos_sum: float, tokens: int) -> float:
    """ShortGPT's BI of a layer: 1 - the mean cosine similarity of its input and output hidden states."""
    return 1.0 - cos_sum / max(tokens, 1)


def layers_to_drop(influence: list[float], count: int) -> list[int]:
    """The `count` layers of lowest block influence (ties: the later layer first), in increasing order."""
    order = sorted(range(len(influence)), key=lambda i: (influence[i], -i))
    return sorted(order[:count])


def top_indices(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` most important indices, in their original order."""
    return torch.sort(torch.topk(importance.double(), keep).indices).values


# ---------------------------------------------------------------------------------------------- unstructured
def prune_unstructured(model, method: str, *, sparsity: float | None, pattern: tuple[int, int] | None,
                       windows: torch.Tensor | None, batch_size: int = 8,
                       say: Callable[[str], None] = lambda s: None) -> dict:
    """Zero weights of every decoder layer's linear layers in place; returns the record's numbers."""
    from tunelab.infer.calibration import decoder_layers, input_square_sums, linear_layers

    layers = decoder_layers(model)
    pruned = total = 0
    for index, layer in enumerate(layers):
        linears = linear_layers(layer)
        norms = input_square_sums(model, windows, index, batch_size=batch_size) if method == "wanda" else {}
        for name, linear in linears.items():
            w = linear.weight.data
            score = wanda_score(w, norms[name]) if method == "wanda" else w.abs()
            if pattern is not None:
                try:
                    keep = nm_mask(score, *pattern)
                except ValueError as e:
                    raise UserError(f"--pattern {pattern[0]}:{pattern[1]}: layer {index} {name}: {e}") from None
            elif method == "wanda":
                keep = row_mask(score, sparsity)
            else:
                keep = layer_mask(score, sparsity)
            w.mul_(keep.to(w.dtype))
            pruned += int((~keep).sum())
            total += keep.numel()
        say(f"prune: layer {index + 1}/{len(layers)} done")
    return {"pruned_weights": pruned, "prunable_weights": total, "sparsity_of_prunable": pruned / max(total, 1)}


# ------------------------------------------------------------------------------------------------- structured
def drop_layers(model, windows: torch.Tensor, count: int, *, batch_size: int = 8) -> dict:
    """Remove the `count` decoder layers of lowest block influence; the config follows."""
    from tunelab.infer.calibration import decoder_layers, layer_io

    layers = decoder_layers(model)
    if not 0 < count < len(layers):
        raise UserError(f"--drop: between 1 and {len(layers) - 1} of the model's {len(layers)} layers, got {count}")
    influence = [block_influence(float(s), int(n)) for s, n in layer_io(model, windows, batch_size=batch_size)]
    dropped = layers_to_drop(influence, count)
    kept = [i for i in range(len(layers)) if i not in dropped]
    new = torch.nn.ModuleList([layers[i] for i in kept])
    for j, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    from tunelab.models.wrappers import core_model

    core = core_model(model)
    core.get_decoder().layers = new
    config = core.config
    config.num_hidden_layers = len(kept)
    for key in ("layer_types",):
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, key, [values[i] for i in kept])
    return {"dropped_layers": dropped, "block_influence": [round(b, 6) for b in influence]}


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                            device=weight.device)
    layer.weight.data.copy_(weight)
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


def _rows(linear, index):
    return _linear(linear.weight.data[index], None if linear.bias is None else linear.bias.data[index])


def _cols(linear, index):
    return _linear(linear.weight.data[:, index], None if linear.bias is None else linear.bias.data)


def shrink_width(model, windows: torch.Tensor, *, mlp: float, heads: float, batch_size: int = 8,
                 say: Callable[[str], None] = lambda s: None) -> dict:
    """Remove the share `mlp` of every MLP's intermediate neurons and `heads` of every attention layer's key-value
    head groups (module docstring); the config follows."""
    from tunelab.infer.calibration import decoder_layers, input_square_sums
    from tunelab.models.wrappers import core_model

    config = core_model(model).config
    layers = decoder_layers(model)
    inter = int(config.intermediate_size)
    n_heads, n_kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or
                                                         config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    keep_inter = inter - int(round(mlp * inter))
    keep_kv = n_kv - int(round(heads * n_kv))
    if mlp and not 0 < keep_inter < inter:
        raise UserError(f"--mlp {mlp}: would keep {keep_inter} of {inter} MLP neurons")
    if heads and not 0 < keep_kv < n_kv:
        raise UserError(f"--heads {heads}: would keep {keep_kv} of {n_kv} key-value heads (each layer has {n_kv}; "
                        "whole key-value groups are removed)")
    group = n_heads // n_kv
    for index, layer in enumerate(layers):
        names = [n for n, on in (("mlp.down_proj", mlp), ("self_attn.o_proj", heads)) if on]
        sq = input_square_sums(model, windows, index, names=names, batch_size=batch_size)
        if mlp:
            m = layer.mlp
            importance = sq["mlp.down_proj"].sqrt() * m.down_proj.weight.data.double().norm(dim=0)
            keep = top_indices(importance, keep_inter)
            m.gate_proj, m.up_proj, m.down_proj = _rows(m.gate_proj, keep), _rows(m.up_proj, keep), \
                _cols(m.down_proj, keep)
            if hasattr(m, "intermediate_size"):
                m.intermediate_size = keep_inter
        if heads:
            a = layer.self_attn
            column = sq["self_attn.o_proj"].sqrt() * a.o_proj.weight.data.double().norm(dim=0)
            per_group = column.reshape(n_kv, group * head_dim).sum(-1)
            kept_groups = top_indices(per_group, keep_kv)
            kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in kept_groups.tolist()])
            q_rows = torch.cat([torch.arange(g * group * head_dim, (g + 1) * group * head_dim)
                                for g in kept_groups.tolist()])
            a.q_proj, a.k_proj, a.v_proj = _rows(a.q_proj, q_rows), _rows(a.k_proj, kv_rows), _rows(a.v_proj, kv_rows)
            a.o_proj = _cols(a.o_proj, q_rows)
            for attr, value in (("num_heads", keep_kv * group), ("num_key_value_heads", keep_kv)):
                if hasattr(a, attr):
                    setattr(a, attr, value)
        say(f"prune: layer {index + 1}/{len(layers)} done")
    if mlp:
        config.intermediate_size = keep_inter
    if heads:
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = keep_kv * group, keep_kv, head_dim
    return {"intermediate_size": [inter, config.intermediate_size],
            "attention_heads": [n_heads, int(config.num_attention_heads)],
            "key_value_heads": [n_kv, int(getattr(config, "num_key_value_heads", n_kv))]}


# ------------------------------------------------------------------------------------------------------- run
def run_prune(*, model: str, adapter: list[str], out, method: str, sparsity: float | None = None,
              pattern: str = "unstructured", drop: float | None = None, mlp: float = 0.0, heads: float = 0.0,
              calibration=None, samples: int = 64, length: int = 256, seed: int = 0, batch_size: int = 8,
              allow_pickle: bool = False, trust_remote_code: bool = False, echo: bool = True) -> dict:
    """Prune `model` (+ merged adapters) and write the result to `out` (module docstring). `calibration`: a Config
    whose data.train holds the calibration text (wanda, layers, width). Returns the record written."""
    import sys
    from pathlib import Path

    from tunelab import __version__
    from tunelab.infer.calibration import calibration_windows, decoder_layers
    from tunelab.infer.evaluate import count_parameters
    from tunelab.infer.export import check_out, to_stored_dtype, write_model_folder
    from tunelab.infer.loading import load_for_inference

    def say(line: str) -> None:
        if echo:
            print(line, file=sys.stderr)

    if method not in PRUNE_METHODS:
        raise UserError(f"prune: --method must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    nm = parse_pattern(pattern)
    if method in UNSTRUCTURED:
        if nm is None and (sparsity is None or not 0 < sparsity < 1):
            raise UserError(f"--sparsity: the share of weights to prune, in (0, 1), got {sparsity}")
        if nm is not None and sparsity is not None and not math.isclose(sparsity, 1 - nm[0] / nm[1]):
            raise UserError(f"--sparsity {sparsity} and --pattern {pattern} disagree ({pattern} is "
                            f"{1 - nm[0] / nm[1]:.3g}); give one")
    elif method == "layers":
        if drop is None or drop <= 0:
            raise UserError(f"--drop: the layers to remove, a share in (0, 1) or a count >= 1, got {drop}")
    else:
        for name, value in (("mlp", mlp), ("heads", heads)):
            if not 0 <= value < 1:
                raise UserError(f"--{name}: the share to remove, in [0, 1), got {value}")
        if not mlp and not heads:
            raise UserError("prune --method width: give --mlp and/or --heads (the shares to remove)")
    needs_data = method != "magnitude"
    if needs_data and calibration is None:
        raise UserError(f"prune --method {method}: needs --calibration (a data file or config to measure "
                        "activations on)")
    out = Path(out)
    check_out(out, {"--model": [model], "--adapter": list(adapter)})
    net, tok = load_for_inference(model, adapter or None, dtype="float32", merge=True, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code)
    net.eval()
    windows = calibration_windows(calibration, tok, samples=samples, length=length, seed=seed) \
        if needs_data else None
    if windows is not None:
        say(f"prune: calibrating on {windows.shape[0]} windows of {windows.shape[1]} tokens")
    before = count_parameters(net)[0]
    info: dict = {"method": method}
    if method in UNSTRUCTURED:
        info.update(pattern=pattern, sparsity=sparsity if nm is None else 1 - nm[0] / nm[1])
        info.update(prune_unstructured(net, method, sparsity=sparsity, pattern=nm, windows=windows,
                                       batch_size=batch_size, say=say))
    elif method == "layers":
        total = len(decoder_layers(net))
        count = int(drop) if drop >= 1 else int(round(drop * total))
        info.update(drop_layers(net, windows, count, batch_size=batch_size))
        say(f"prune: dropped layers {info['dropped_layers']} of {total}")
    else:
        info.update(mlp=mlp, heads=heads)
        info.update(shrink_width(net, windows, mlp=mlp, heads=heads, batch_size=batch_size, say=say))
    info.update(parameters=[before, count_parameters(net)[0]], calibration=None if windows is None else
                {"windows": int(windows.shape[0]), "length": int(windows.shape[1]), "seed": seed})
    net = to_stored_dtype(net, model, trust_remote_code=trust_remote_code)
    manifest = {"written_by": f"tunelab {__version__} prune", "model": str(model), "adapters": list(adapter)}
    write_model_folder(net, tok, out, manifest, extra={RECORD: record_text("prune", info) + "\n"})
    return info
