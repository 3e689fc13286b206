"""`tunelab lowrank`: each decoder linear replaced by two thinner ones from its truncated SVD, at a rank, an energy
threshold or a share of its parameters, optionally whitened by its inputs on calibration text (models/lowrank.py
has the math and the folder format; docs/compression.md).

Whitened factorisation calibrates sequentially, like GPTQ and Wanda (infer/calibration.py): each decoder layer's
input Hessians are taken on what the already factored layers before it give. The record (tunelab_compression.json)
holds every layer's rank, kept energy and relative error: ||W - W'||^2 / ||W||^2, or with whitening the outputs'
sum ||(W - W') x||^2 / sum ||W x||^2 on the calibration tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tunelab.errors import UserError


def run_lowrank(*, model: str, adapter: list[str], out, rank: int | None = None, energy: float | None = None,
                ratio: float | None = None, whiten: bool = False, calibration=None, samples: int = 64,
                length: int = 256, seed: int = 0, batch_size: int = 8, damp: float = 0.01, allow_pickle: bool = False,
                trust_remote_code: bool = False, echo: bool = True) -> dict:
    from tunelab import __version__
    from tunelab.infer.calibration import calibration_windows, decoder_layers, input_hessians, linear_layers
    from tunelab.infer.evaluate import count_parameters
    from tunelab.infer.export import check_out, write_model_folder
    from tunelab.infer.loading import load_for_inference
    from tunelab.models.compressed import layer_error
    from tunelab.models.lowrank import (
        LOWRANK_FILE,
        LowRankLinear,
        factor,
        lowrank_ranks,
        saves_parameters,
        write_ranks,
    )
    from tunelab.models.record import RECORD, record_text

    def say(line: str) -> None:
        if echo:
            print(line, file=sys.stderr)

    given = [k for k, v in (("--rank", rank), ("--energy", energy), ("--ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise UserError("lowrank: give one of --rank (the same for every layer), --energy (a share of the singular "
                        "values' energy to keep) or --ratio (a share of each layer's parameters)"
                        + (f"; got {' and '.join(given)}" if given else ""))
    if rank is not None and rank < 1:
        raise UserError(f"--rank: at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy: a share of the energy in (0, 1], got {energy}")
    if ratio is not None and not 0 < ratio < 1:
        raise UserError(f"--ratio: a share of each layer's parameters in (0, 1), got {ratio}")
    if whiten and calibration is None:
        raise UserError("lowrank --whiten: needs --calibration (a data file or config whose text gives each layer's "
                        "inputs)")
    if not whiten and calibration is not None:
        raise UserError("lowrank: --calibration is used with --whiten only")
    if not 0 <= damp < 1:
        raise UserError(f"--damp: in [0, 1), got {damp}")
    if lowrank_ranks(model) is not None:
        raise UserError(f"--model: {model} is already a low-rank folder; factor the original (or its export)")
    out = Path(out)
    check_out(out, {"--model": [model], "--adapter": list(adapter)})
    net, tok = load_for_inference(model, adapter or None, dtype="float32", merge=True, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code)
    net.eval()
    before = count_parameters(net)[0]
    windows = calibration_windows(calibration, tok, samples=samples, length=length, seed=seed) if whiten else None
    if windows is not None:
        say(f"lowrank: calibrating on {windows.shape[0]} windows of {windows.shape[1]} tokens")
    layers = decoder_layers(net)
    if rank is not None and not any(saves_parameters(m.out_features, m.in_features, rank)
                                    for layer in layers for m in linear_layers(layer).values()):
        raise UserError(f"--rank {rank}: no layer gets smaller at this rank (a rank-r layer stores r x (in + out) "
                        "weights); choose a lower one")
    rows, kept_dense = [], []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            hessians = input_hessians(net, windows, i, batch_size=batch_size) if windows is not None else {}
            row = {}
            for name, linear in linear_layers(layer).items():
                w = linear.weight.data
                h = hessians.get(name)
                b, a, facts = factor(w, rank=rank, energy=energy, ratio=ratio, hessian=h, damp=damp)
                r = facts["rank"]
                if not saves_parameters(*w.shape, r):
                    kept_dense.append(f"layers.{i}.{name}")
                    row[name] = {"rank": None, "energy": 1.0, "relative_error": 0.0}
                    continue
                w_hat = b.double() @ a.double()
                if h is not None:  # the outputs' change on the calibration inputs, relative to the outputs
                    err = layer_error(w, w_hat, h) / (layer_error(w, torch.zeros_like(w_hat), h) or 1.0)
                else:
                    err = float(((w.double() - w_hat) ** 2).sum()) / (float((w.double() ** 2).sum()) or 1.0)
                new = LowRankLinear(linear.in_features, linear.out_features, r, linear.bias is not None,
                                    dtype=w.dtype, device=w.device)
                new.a.weight.copy_(a)
                new.b.weight.copy_(b)
                if linear.bias is not None:
                    new.b.bias.copy_(linear.bias)
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, new)
                row[name] = {"rank": r, "energy": facts["energy"], "relative_error": err}
            rows.append(row)
            say(f"lowrank: layer {i + 1}/{len(layers)} done")
    after = count_parameters(net)[0]
    factored = sum(1 for row in rows for v in row.values() if v["rank"] is not None)
    if not factored:
        raise UserError("lowrank: no layer gets smaller at this rank (a rank-r layer stores r x (in + out) "
                        "weights); choose a lower --rank, --energy or --ratio")
    info = {"rank": rank, "energy": energy, "ratio": ratio, "whitened": whiten, "factored_linears": factored,
            "kept_dense": kept_dense, "parameters": [before, after], "layers": rows,
            "format": f"tunelab low-rank ({LOWRANK_FILE}); `tunelab export` writes a standard dense folder"}
    if windows is not None:
        info.update(calibration={"windows": int(windows.shape[0]), "length": int(windows.shape[1]), "seed": seed},
                    damp=damp)
    manifest = {"written_by": f"tunelab {__version__} lowrank", "model": str(model), "adapters": list(adapter)}
    def save(folder: Path) -> None:
        net.save_pretrained(folder, safe_serialization=True)
        write_ranks(net, folder)

    write_model_folder(net, tok, out, manifest, extra={RECORD: record_text("lowrank", info) + "\n"}, save=save)
    return info
