"""`tunelab quantize`: 8- and 4-bit integer weights by round-to-nearest or GPTQ, written as a compressed-tensors
folder (models/compressed.py has the math, the conventions and why this format; docs/compression.md).

GPTQ calibrates sequentially, like Wanda (infer/calibration.py): each decoder layer's Hessians H = sum x x^T are
taken on the inputs the already quantized layers before it give, and its weights are replaced by their quantized
values before the next layer is measured. The record (tunelab_compression.json) holds the scheme and, per layer,
how much the layer's outputs on the calibration tokens moved: sum ||(W - W') x||^2 relative to sum ||W x||^2, for
the method used and, with GPTQ, for round-to-nearest too (the error GPTQ saved).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tunelab.errors import UserError

QUANT_METHODS = ("rtn", "gptq")


def run_quantize(*, model: str, adapter: list[str], out, spec, method: str = "rtn", calibration=None,
                 samples: int = 64, length: int = 256, seed: int = 0, batch_size: int = 8, damp: float = 0.01,
                 allow_pickle: bool = False, trust_remote_code: bool = False, echo: bool = True) -> dict:
    from tunelab import __version__
    from tunelab.infer.calibration import calibration_windows, decoder_layers, input_hessians, linear_layers
    from tunelab.infer.export import check_out, write_model_folder
    from tunelab.infer.loading import load_for_inference
    from tunelab.models.compressed import dequantize, gptq, layer_error, rtn
    from tunelab.models.record import RECORD, record_text

    def say(line: str) -> None:
        if echo:
            print(line, file=sys.stderr)

    spec.check()
    if method not in QUANT_METHODS:
        raise UserError(f"quantize: --method must be one of {', '.join(QUANT_METHODS)}, got {method!r}")
    if method == "gptq" and calibration is None:
        raise UserError("quantize --method gptq: needs --calibration (a data file or config whose text gives each "
                        "layer's inputs)")
    if not 0 <= damp < 1:
        raise UserError(f"--damp: in [0, 1), got {damp}")
    out = Path(out)
    check_out(out, {"--model": [model], "--adapter": list(adapter)})
    net, tok = load_for_inference(model, adapter or None, dtype="float32", merge=True, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code)
    net.eval()
    layers = decoder_layers(net)
    for i, layer in enumerate(layers):
        for name, linear in linear_layers(layer).items():
            spec.check_layer(linear.in_features, f"layer {i} {name}")
    windows = calibration_windows(calibration, tok, samples=samples, length=length, seed=seed) \
        if method == "gptq" else None
    if windows is not None:
        say(f"quantize: calibrating on {windows.shape[0]} windows of {windows.shape[1]} tokens")
    full_names = {id(m): n for n, m in net.named_modules()}
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors = []
    for i, layer in enumerate(layers):
        linears = linear_layers(layer)
        hessians = input_hessians(net, windows, i, batch_size=batch_size) if windows is not None else {}
        row = {}
        for name, linear in linears.items():
            w = linear.weight.data
            q, scale, zero = gptq(w, hessians[name], spec, damp=damp) if method == "gptq" else rtn(w, spec)
            w_hat = dequantize(q, scale, zero, spec)
            if name in hessians:
                h = hessians[name]
                base = float(torch.einsum("ij,jk,ik->", w.double(), h, w.double())) or 1.0
                row[name] = {"gptq": layer_error(w, w_hat, h) / base,
                             "rtn": layer_error(w, dequantize(*rtn(w, spec), spec), h) / base}
            linear.weight.data.copy_(w_hat.to(w.dtype))
            params[full_names[id(linear)]] = (scale, zero)
        errors.append(row)
        say(f"quantize: layer {i + 1}/{len(layers)} done")
    info = {"method": method, "bits": spec.bits, "symmetric": spec.symmetric, "granularity": spec.granularity,
            "group_size": spec.group_size, "format": f"compressed-tensors {spec.storage}",
            "quantized_linears": len(params)}
    if windows is not None:
        info.update(calibration={"windows": int(windows.shape[0]), "length": int(windows.shape[1]), "seed": seed},
                    damp=damp, relative_output_error=errors)
    manifest = {"written_by": f"tunelab {__version__} quantize", "model": str(model), "adapters": list(adapter)}
    from tunelab.models.compressed import save_compressed

    write_model_folder(net, tok, out, manifest, extra={RECORD: record_text("quantize", info) + "\n"},
                       save=lambda folder: save_compressed(net, folder, spec, params, targets=["Linear"]))
    return info
