"""The `tunelab` command line. One dict of commands; heavy imports happen inside the command functions so that
`tunelab --help` answers without importing torch."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable


def _config_help() -> str:
    from tunelab.config.docs import options_text

    return "config keys (section.key=value overrides; see also `tunelab config`):\n" + options_text(indent="  ")


def cmd_train(args: argparse.Namespace) -> int:
    nodes = args.nnodes or 1
    if ((args.nproc and args.nproc > 1) or nodes > 1) and "LOCAL_RANK" not in os.environ:
        from tunelab.engine.distributed import Nodes, launch

        return launch(args.config, args.overrides, args.nproc or 1, debug=args.debug,
                      nodes=Nodes(nodes, args.node_rank, args.master_addr, args.master_port))
    from tunelab import api

    api.train(args.config, args.overrides)
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """Close the processes' group after a run that ended well, then leave the process without the interpreter's
    teardown: gloo's threads outlive destroy_process_group (its TCP loop and the worker threads of groups that C++
    objects still hold), and destroying them at teardown now and then aborts ("terminate called without an active
    exception", SIGABRT) a process that trained and saved everything. Exit handlers run and the output is flushed
    first. A process that is not a launched rank (WORLD_SIZE unset or 1) returns as usual."""
    import sys as _sys

    dist = _sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return  # not a launched rank (an in-process caller such as a test): the caller's process goes on
        import atexit

        atexit._run_exitfuncs()
        _sys.stdout.flush()
        _sys.stderr.flush()
        os._exit(0)


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.infer.chat import GenerationOptions, run_chat

    opts = GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0 and not args.greedy and args.num_beams == 1,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        seed=args.seed,
    )
    return run_chat(
        model=args.model,
        adapter=args.adapter,
        template=args.template,
        system=args.system,
        prompt=args.prompt,
        options=opts,
        stream=not args.no_stream,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab import api

    report = api.generate_data(model=args.model, adapter=args.adapter, data=args.data, out=args.out,
                               format=args.format, data_format=args.data_format, template=args.template,
                               system=args.system, max_length=args.max_length, overrides=args.overrides,
                               allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                               n=args.n, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p,
                               top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    print(report.text())
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    import json

    from tunelab import api

    report = api.evaluate_perplexity(model=args.model, adapter=args.adapter, data=args.data, kind=args.kind,
                                     data_format=args.data_format, template=args.template,
                                     max_length=args.max_length, batch_size=args.batch_size,
                                     overrides=args.overrides, allow_pickle=args.allow_pickle,
                                     trust_remote_code=args.trust_remote_code)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.text())
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from tunelab import api

    info = api.prune(model=args.model, adapter=args.adapter, out=args.out, method=args.method,
                     sparsity=args.sparsity, pattern=args.pattern, drop=args.drop, mlp=args.mlp, heads=args.heads,
                     calibration=args.calibration, data_format=args.data_format, template=args.template,
                     overrides=args.overrides, samples=args.samples, length=args.length, seed=args.seed,
                     batch_size=args.batch_size, allow_pickle=args.allow_pickle,
                     trust_remote_code=args.trust_remote_code)
    before, after = info["parameters"]
    extra = f", {100 * info['sparsity_of_prunable']:.1f}% of the decoder's linear weights zero" \
        if "sparsity_of_prunable" in info else ""
    print(f"pruned ({args.method}): {before:,} -> {after:,} parameters{extra}; written to {args.out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from tunelab import api

    info = api.quantize(model=args.model, adapter=args.adapter, out=args.out, bits=args.bits,
                        symmetric=not args.asymmetric, granularity=args.granularity, group_size=args.group_size,
                        method=args.method, calibration=args.calibration, data_format=args.data_format,
                        template=args.template, overrides=args.overrides, samples=args.samples, length=args.length,
                        seed=args.seed, batch_size=args.batch_size, damp=args.damp, allow_pickle=args.allow_pickle,
                        trust_remote_code=args.trust_remote_code)
    print(f"quantized ({args.method}, int{args.bits} {'asymmetric' if args.asymmetric else 'symmetric'}, "
          f"{args.granularity}): {info['quantized_linears']} linear layers, {info['format']}; written to {args.out}")
    return 0


def cmd_lowrank(args: argparse.Namespace) -> int:
    from tunelab import api

    info = api.lowrank(model=args.model, adapter=args.adapter, out=args.out, rank=args.rank, energy=args.energy,
                       ratio=args.ratio, whiten=args.whiten, calibration=args.calibration,
                       data_format=args.data_format, template=args.template, overrides=args.overrides,
                       samples=args.samples, length=args.length, seed=args.seed, batch_size=args.batch_size,
                       damp=args.damp, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    before, after = info["parameters"]
    print(f"low-rank ({'whitened ' if info['whitened'] else ''}SVD): {info['factored_linears']} linear layers "
          f"factored, parameters {before:,} -> {after:,}; written to {args.out}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from tunelab import api

    info = api.average(out=args.out, models=args.model, run=args.run, last=args.last, ema=args.ema)
    weights = ", ".join(f"{w:.4g}" for w in info["weights"])
    print(f"averaged ({info['method']}) {len(info['inputs'])} {info['kind']} folders, weights {weights}; written to "
          f"{args.out}")
    return 0


def _calibration_options(parser, what: str) -> None:
    parser.add_argument("--calibration", help=f"a data file or training config whose text {what}")
    parser.add_argument("overrides", nargs="*", help="dotted data overrides with a config (data.template=chatml)")
    parser.add_argument("--data-format", default="auto", help="row format of a --calibration file (default: detected)")
    parser.add_argument("--template", help="chat template conversations are rendered with (default: the model's)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--length", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the windows' positions")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")


def _loading_options(parser) -> None:
    parser.add_argument("--allow-pickle", action="store_true", help="load pickle weights (pytorch_model.bin, *.pt) "
                        "when a folder has no safetensors; unpickling runs code from the file: only for folders "
                        "you trust")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the "
                        "checkpoint; only for checkpoints you trust")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def cmd_score(args: argparse.Namespace) -> int:
    from tunelab import api

    scores = api.score(model=args.model, adapter=args.adapter, prompt=args.prompt, answers=args.answer,
                       template=args.template, system=args.system, allow_pickle=args.allow_pickle,
                       trust_remote_code=args.trust_remote_code)
    for answer, value in zip(args.answer, scores):
        print(f"{value:+.4f}\t{answer}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab import api

    out = api.export(model=args.model, adapter=args.adapter, out=args.out, run=args.run,
                     checkpoint=args.checkpoint, dtype=args.dtype,
                     merge_base=args.merge_base, allow_pickle=args.allow_pickle,
                     trust_remote_code=args.trust_remote_code, keep_sparsity=args.keep_sparsity)
    print(f"exported: {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from tunelab import api

    report = api.data_check(args.source, format=args.format, model=args.model, max_length=args.max_length,
                            template=args.template, overrides=args.overrides, method=args.method)
    print(report.text())
    return 0 if report.ok else 2


def cmd_data_preview(args: argparse.Namespace) -> int:
    from tunelab import api

    color = sys.stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ
    print(api.data_preview(args.source, model=args.model, n=args.n, color=color, format=args.format,
                           template=args.template, overrides=args.overrides, method=args.method))
    return 0


def cmd_init_model(args: argparse.Namespace) -> int:
    from tunelab import api

    path = api.init_model(args.kind, args.dir, hidden=args.hidden, layers=args.layers, heads=args.heads,
                          intermediate=args.intermediate, vocab=args.vocab, seed=args.seed)
    print(f"model written to {path}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from tunelab.utils.env import env_report

    print(env_report())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from tunelab.config.docs import options_text

    print(options_text(section=args.section))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tunelab.errors import UserError

    if args.peak:
        import torch

        from tunelab.engine.bench import device_name, measure_peak

        dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
        flops = measure_peak(dtype, refresh=True)
        print(f"peak: {flops / 1e9:,.1f} GFLOP/s in {dtype} on {device_name()} (large matmul; cached for MFU)")
        return 0
    if not args.config:
        raise UserError("bench: give a CONFIG to benchmark, or --peak to measure the device's peak FLOP/s")
    if args.steps < 1 or args.warmup < 1:
        raise UserError(f"bench: --steps and --warmup must be >= 1, got {args.steps} and {args.warmup}")
    from tunelab.engine.bench import format_report, run_bench

    result = run_bench(args.config, args.overrides, steps=args.steps, warmup=args.warmup, echo=False)
    print(format_report(result))
    out = Path(args.json) if args.json else Path("runs") / "bench" / f"{Path(args.config).stem}.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"bench: cannot write {out}: {e.strerror or e}") from None
    print(f"  JSON: {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from tunelab.config import load_config
    from tunelab.engine.plan import plan_from_config
    from tunelab.errors import UserError

    if args.devices < 1:
        raise UserError(f"plan: --devices must be >= 1, got {args.devices}")
    if args.memory_gb is not None and args.memory_gb <= 0:
        raise UserError(f"plan: --memory-gb must be > 0, got {args.memory_gb}")
    if args.fsdp2 and args.zero:
        raise UserError("plan: --fsdp2 and --zero are two engines; give one")
    cfg = load_config(args.config, args.overrides)
    config_stage = {"zero1": 1, "zero2": 2, "zero3": 3}.get(cfg.train.distributed, 0)
    if args.offload and (args.zero if args.zero is not None else (0 if args.fsdp2 else config_stage)) == 0:
        raise UserError("plan: --offload needs DeepSpeed ZeRO (--zero 1, 2 or 3, or train.distributed zero1-3)")
    report = plan_from_config(cfg, devices=args.devices, memory_gb=args.memory_gb, zero_stage=args.zero,
                              offload=args.offload, device=args.device, measure_data=args.measure_data,
                              calibrate=args.calibrate, fsdp2=args.fsdp2)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.text())
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "chat": cmd_chat,
    "generate": cmd_generate,
    "eval ppl": cmd_eval_ppl,
    "prune": cmd_prune,
    "quantize": cmd_quantize,
    "lowrank": cmd_lowrank,
    "average": cmd_average,
    "score": cmd_score,
    "export": cmd_export,
    "data check": cmd_data_check,
    "data preview": cmd_data_preview,
    "init-model": cmd_init_model,
    "env": cmd_env,
    "config": cmd_config,
    "bench": cmd_bench,
    "plan": cmd_plan,
}


class _TrainHelp(argparse.Action):
    """`tunelab train --help` lists every config key with its help text (built only when asked)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = _config_help()
        parser.print_help()
        parser.exit()


# The folder `tunelab init-model` writes in the epilog: the one examples/*.yaml read as model.path.
QUICKSTART_MODEL = "models/tiny-llama"


def _description() -> str:
    """What tunelab does, from the registries of methods and adapters (so it cannot go stale). The config schema
    is plain dataclasses: importing it keeps `tunelab --help` fast and free of torch."""
    from typing import Literal, get_args, get_origin, get_type_hints

    from tunelab.config.schema import ADAPTER_CONFIGS, METHOD_CONFIGS

    methods = []
    for name, cls in METHOD_CONFIGS.items():
        loss = get_type_hints(cls).get("loss")
        variants = get_args(loss) if get_origin(loss) is Literal else ()
        methods.append(f"{name} (losses: {', '.join(variants)})" if len(variants) > 1 else name)
    text = (f"Fine-tune language models. Methods (method.type): {', '.join(methods)}. Adapters (adapter.type): "
            f"{', '.join(ADAPTER_CONFIGS)}. Also: exact resume, data-parallel launch, benchmarks, memory "
            "planning, data checks and previews, export and chat.")
    return textwrap.fill(text, width=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunelab",
        description=_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Start with: tunelab init-model tiny-llama {QUICKSTART_MODEL} && tunelab train examples/sft_lora.yaml",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train from a YAML config", add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train from a YAML config; section.key=value arguments override it.")
    t.add_argument("-h", "--help", action=_TrainHelp, nargs=0, help="show this help and every config key")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 adapter.r=16")
    t.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (one per GPU, or per CPU core), launched through torchrun")
    t.add_argument("--nnodes", type=int, default=1, help="machines in the run (each starts the same command)")
    t.add_argument("--node-rank", type=int, default=0, help="this machine's index among --nnodes (0 is the main)")
    t.add_argument("--master-addr", default="127.0.0.1",
                   help="address of machine 0, where the run's rendezvous listens (several machines)")
    t.add_argument("--master-port", type=int, default=0,
                   help="port of the rendezvous on machine 0 (default: a free one; set it with several machines)")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    c = sub.add_parser("chat", help="chat with a model (interactive, or one answer with --prompt)")
    c.add_argument("--model", required=True, help="model folder (a base model or an exported one)")
    c.add_argument("--adapter", action="append", help="adapter folder to apply on top of the model; repeat to load "
                   "several (stacked; switch with /adapter NAME)")
    c.add_argument("--template", default="auto", help="chat template (default: the one saved with the model/adapter)")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--prompt", help="answer this one prompt and exit")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (>= 1)")
    c.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    c.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--top-k", type=int, default=50)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--num-beams", type=int, default=1, help="beam search width (1: no beam search)")
    c.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty")
    c.add_argument("--seed", type=int, default=0, help="sampling seed")
    c.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    c.add_argument("--allow-pickle", action="store_true", help="load pickle weights (pytorch_model.bin, *.pt) when a "
                   "folder has no safetensors; unpickling runs code from the file: only for folders you trust")
    c.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint; "
                   "only for checkpoints you trust")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    g = sub.add_parser("generate", help="answer every prompt of a dataset and write training rows (distillation "
                       "data)", description="Answer every prompt of --data with --model (+ --adapter) in batches and "
                       "append the answers as alpaca or sharegpt JSON lines that tunelab train reads. An interrupted "
                       "run, started again with the same arguments, continues where it stopped.")
    g.add_argument("--model", required=True, help="model folder (a base model, an exported one, or a run's final/)")
    g.add_argument("--adapter", action="append", help="adapter folder to apply (merged for speed when it can be); "
                   "repeat to stack several")
    g.add_argument("--data", required=True, help="a data file (or folder), or a training config whose data.train "
                   "is read; alpaca rows give instruction + input, conversations their turns before the last answer")
    g.add_argument("--out", required=True, help="the JSON-lines file to write (FILE.progress.json beside it records "
                   "how it is being generated)")
    g.add_argument("overrides", nargs="*", help="dotted data overrides with a config (data.max_length=512)")
    g.add_argument("--format", default="alpaca", choices=["alpaca", "sharegpt"], help="rows written (default alpaca)")
    g.add_argument("--data-format", default="auto", help="row format of a --data file (default: detected)")
    g.add_argument("--template", help="chat template (default: the data config's, else the model's)")
    g.add_argument("--system", help="system prompt for rows that have none")
    g.add_argument("--max-length", type=int, help="longest prompt in tokens, cut from the left (default: the "
                   "config's data.max_length, else 1024)")
    g.add_argument("--n", type=int, default=1, help="answers per prompt (default 1)")
    g.add_argument("--batch-size", type=int, default=16, help="answers generated at once (default 16)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (>= 1)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (each answer has its own stream from it)")
    g.add_argument("--allow-pickle", action="store_true", help="load pickle weights (pytorch_model.bin, *.pt) when a "
                   "folder has no safetensors; unpickling runs code from the file: only for folders you trust")
    g.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint; "
                   "only for checkpoints you trust")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    ev = sub.add_parser("eval", help="evaluate a model (ppl: perplexity, size and speed)")
    evsub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    pp = evsub.add_parser("ppl", help="perplexity on the trained tokens of a dataset, with parameters, size on disk "
                          "and inference tokens/s", description="Perplexity of --model (+ --adapter) on the tokens "
                          "training would score in --data (assistant turns of conversations, or every token of "
                          "text), with its parameter count (and sparsity), the size of its weights on disk and its "
                          "inference speed: the yardstick of compression (docs/compression.md).")
    pp.add_argument("--model", required=True, help="model folder (a base, exported, pruned or quantized model)")
    pp.add_argument("--adapter", action="append", help="adapter folder to apply; repeat to stack several")
    pp.add_argument("--data", required=True, help="a data file (or folder), or a training config (its data.train)")
    pp.add_argument("overrides", nargs="*", help="dotted data overrides with a config (data.max_length=512)")
    pp.add_argument("--kind", choices=["chat", "text"], help="score assistant turns (chat) or every token (text); "
                    "default: text for a text-format file, else the config method's kind, else chat")
    pp.add_argument("--data-format", default="auto", help="row format of a --data file (default: detected)")
    pp.add_argument("--template", help="chat template (default: the config's, else the model's)")
    pp.add_argument("--max-length", type=int, help="truncation length (default: the config's, else 1024)")
    pp.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    pp.add_argument("--json", action="store_true", help="print the report as JSON")
    pp.add_argument("--allow-pickle", action="store_true", help="load pickle weights (pytorch_model.bin, *.pt) when "
                    "a folder has no safetensors; unpickling runs code from the file: only for folders you trust")
    pp.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint; "
                    "only for checkpoints you trust")
    pp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    pr = sub.add_parser("prune", help="prune a model: magnitude or Wanda (unstructured, N:M), whole layers, or MLP "
                        "width and attention heads", description="Prune --model (+ merged --adapter) into --out, a "
                        "standard HF folder (docs/compression.md). magnitude and wanda zero the share --sparsity of "
                        "every decoder linear layer's weights, or keep N of every M (--pattern 2:4); layers drops "
                        "the --drop decoder layers that change the hidden state least; width removes the share "
                        "--mlp of MLP neurons and --heads of key-value head groups of least importance. All but "
                        "magnitude measure activations on --calibration.")
    pr.add_argument("--model", required=True, help="model folder")
    pr.add_argument("--adapter", action="append", help="adapter folder merged into the model first; repeat for "
                    "several")
    pr.add_argument("--out", required=True, help="output folder (a standard HF model folder)")
    pr.add_argument("--method", required=True, choices=["magnitude", "wanda", "layers", "width"])
    pr.add_argument("--sparsity", type=float, help="magnitude/wanda: the share of weights zeroed, in (0, 1)")
    pr.add_argument("--pattern", default="unstructured", help="magnitude/wanda: unstructured (default) or N:M, "
                    "e.g. 2:4 (N kept of every M consecutive inputs)")
    pr.add_argument("--drop", type=float, help="layers: the decoder layers to remove, a share (0.25) or a count (2)")
    pr.add_argument("--mlp", type=float, default=0.0, help="width: the share of MLP neurons to remove")
    pr.add_argument("--heads", type=float, default=0.0, help="width: the share of key-value head groups to remove")
    _calibration_options(pr, "the activations are measured on (wanda, layers, width)")
    _loading_options(pr)

    qu = sub.add_parser("quantize", help="quantize a model's weights to 8 or 4 bits (round-to-nearest or GPTQ), "
                        "written as compressed-tensors", description="Quantize the linear layers of --model's "
                        "decoder (+ merged --adapter) to --bits integers, symmetric or --asymmetric, with one scale "
                        "per tensor, per output channel or per --group-size inputs, by round-to-nearest or GPTQ "
                        "(calibrated on --calibration), and write a compressed-tensors folder that transformers and "
                        "vLLM load (docs/compression.md).")
    qu.add_argument("--model", required=True, help="model folder")
    qu.add_argument("--adapter", action="append", help="adapter folder merged into the model first")
    qu.add_argument("--out", required=True, help="output folder")
    qu.add_argument("--bits", type=int, default=4, choices=[4, 8])
    qu.add_argument("--asymmetric", action="store_true", help="a zero point per scale (default: symmetric)")
    qu.add_argument("--granularity", default="group", choices=["tensor", "channel", "group"],
                    help="one scale per tensor, per output channel, or per group of --group-size inputs (default)")
    qu.add_argument("--group-size", type=int, help="inputs per scale with --granularity group (default 128); it "
                    "must divide every layer's input width")
    qu.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="round-to-nearest (default) or GPTQ")
    qu.add_argument("--damp", type=float, default=0.01, help="gptq: dampening, a share of the Hessian's mean "
                    "diagonal added to it (default 0.01)")
    _calibration_options(qu, "gives GPTQ each layer's inputs")
    _loading_options(qu)

    lr = sub.add_parser("lowrank", help="factor a model's linear layers by truncated SVD (optionally "
                        "activation-whitened)", description="Replace each decoder linear of --model (+ merged "
                        "--adapter) by two thinner ones from its truncated SVD, at one --rank, an --energy share or "
                        "a --ratio of each layer's parameters; --whiten fits them to the layer's inputs on "
                        "--calibration text. The folder loads in every tunelab command; `tunelab export` multiplies "
                        "it back into a standard one (docs/compression.md).")
    lr.add_argument("--model", required=True, help="model folder")
    lr.add_argument("--adapter", action="append", help="adapter folder merged into the model first")
    lr.add_argument("--out", required=True, help="output folder")
    lr.add_argument("--rank", type=int, help="the rank of every factored layer")
    lr.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share of the sum of "
                    "squared singular values, in (0, 1]")
    lr.add_argument("--ratio", type=float, help="per layer, the largest rank storing at most this share of its "
                    "parameters, in (0, 1) (0.5: half)")
    lr.add_argument("--whiten", action="store_true", help="fit the factors to each layer's inputs on --calibration "
                    "(SVD-LLM's whitening)")
    lr.add_argument("--damp", type=float, default=0.01, help="--whiten: a share of the input Hessian's mean "
                    "diagonal added to it (default 0.01)")
    _calibration_options(lr, "gives --whiten each layer's inputs")
    _loading_options(lr)

    av = sub.add_parser("average", help="average checkpoints of one model or adapter (uniform or EMA)",
                        description="Average the weights of two or more --model folders (full models or adapters, "
                        "oldest first) or of the newest --last checkpoints of a --run: the uniform mean, or with --ema "
                        "an exponential moving average; written as a folder of the same kind (docs/compression.md).")
    av.add_argument("--model", action="append", help="a model or adapter folder (repeat, oldest first)")
    av.add_argument("--run", help="a training output folder whose checkpoints to average")
    av.add_argument("--last", type=int, help="with --run: how many of its newest checkpoints")
    av.add_argument("--ema", type=float, help="an EMA of this decay (0 < d < 1) instead of the uniform mean: "
                    "e = d e + (1 - d) x over the inputs in order")
    av.add_argument("--out", required=True, help="output folder")

    s = sub.add_parser("score", help="rewards of a reward model (method rm) for answers to a prompt")
    s.add_argument("--model", required=True, help="an rm run's final/ folder (full/freeze), or the base model with "
                   "--adapter")
    s.add_argument("--adapter", help="the LoRA (peft) reward-model adapter of an rm run")
    s.add_argument("--prompt", required=True, help="the user prompt")
    s.add_argument("--answer", action="append", required=True, help="an answer to score; repeat for several")
    s.add_argument("--template", default="auto", help="chat template (default: the one saved with the model)")
    s.add_argument("--system", help="system prompt")
    s.add_argument("--allow-pickle", action="store_true", help="load pickle weights (pytorch_model.bin, *.pt) when a "
                   "folder has no safetensors; unpickling runs code from the file: only for folders you trust")
    s.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint; "
                   "only for checkpoints you trust")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    e = sub.add_parser("export", help="merge adapters into their base model and write a HF model folder")
    e.add_argument("--model", help="base model folder (default: model.path of --run)")
    e.add_argument("--adapter", action="append", help="adapter folder (default: RUN/final); repeat to merge several")
    e.add_argument("--merge-base", default="trained", choices=["trained", "original"],
                   help="for adapters trained on a quantized base: merge into the dequantized weights they were "
                        "trained against (trained, default) or into the full-precision originals (original)")
    e.add_argument("--keep-sparsity", action="store_true", help="merging an adapter into a model pruned by tunelab "
                   "prune (magnitude, wanda): re-apply the base's zeros to the merged weights (without it such a "
                   "merge, which would fill them, is refused)")
    e.add_argument("--run", help="a training output folder: takes the model and adapter from it")
    e.add_argument("--checkpoint", help="export a training checkpoint instead of RUN/final: a checkpoint folder, or "
                   "with --run the name of one in RUN/checkpoints (checkpoint-000400); a sharded one (zero1-3, "
                   "fsdp2) is gathered into the standard folder first")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the written weights (auto: the base model's)")
    # default None: with --run, what the run's config says (model.allow_pickle / model.trust_remote_code)
    e.add_argument("--allow-pickle", action="store_true", default=None, help="load pickle weights "
                   "(pytorch_model.bin, *.pt) when a folder has no safetensors; unpickling runs code from the file: "
                   "only for folders you trust (default: the --run config's model.allow_pickle, else off)")
    e.add_argument("--trust-remote-code", action="store_true", default=None, help="run model code shipped with the "
                   "checkpoint; only for checkpoints you trust (default: the --run config's "
                   "model.trust_remote_code, else off)")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    d = sub.add_parser("data", help="check or preview training data")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for name, hlp in (("check", "validate data and print statistics"),
                      ("preview", "show rendered samples with the trained tokens highlighted")):
        s = dsub.add_parser(name, help=hlp)
        s.add_argument("source", help="a data file (or folder), or a training config")
        s.add_argument("overrides", nargs="*", help="dotted overrides (e.g. data.max_length=64), before or after "
                       "the options")
        s.add_argument("--format", default="auto", help="row format when SOURCE is a file")
        s.add_argument("--method", help="training method whose data shape to read (sft, pt, rm, dpo, kto, ...: "
                       "pairs for rm and the dpo family, labelled rows for kto, text for pt); default: the "
                       "config's, else sft")
        s.add_argument("--model", help="model/tokenizer folder (for token counts); default: the config's")
        s.add_argument("--template", help="chat template (default: the config's, else auto)")
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name == "check":
            s.add_argument("--max-length", type=int, help="truncation length (default: the config's, else 1024)")
        else:
            s.add_argument("-n", "--rows", dest="n", type=int, default=3, help="number of samples (default 3)")
            s.add_argument("--no-color", action="store_true", help="mark trained tokens with [[ ]] instead of colour")

    i = sub.add_parser("init-model", help="build a tiny model with its own tokenizer, offline, in seconds")
    i.add_argument("kind", choices=["tiny-llama"])
    i.add_argument("dir", help="output folder")
    i.add_argument("--hidden", type=int, default=256)
    i.add_argument("--layers", type=int, default=4)
    i.add_argument("--heads", type=int, default=4)
    i.add_argument("--intermediate", type=int, default=None, help="MLP width (default: about 2.7 x hidden)")
    i.add_argument("--vocab", type=int, default=8000)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    b = sub.add_parser("bench", help="measure training throughput, memory and MFU of a config",
                       description="Train CONFIG for W warm-up + N measured steps (no checkpoints, no evaluation, a "
                       "temporary output folder) and report real tokens/s, samples/s, step time, padding, peak "
                       "memory and MFU. Writes the numbers as JSON too.")
    b.add_argument("config", nargs="?", help="YAML config file")
    b.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.packing=padding_free")
    b.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="warm-up steps before measuring (default 3)")
    b.add_argument("--json", help="where to write the JSON (default runs/bench/CONFIG-NAME.json)")
    b.add_argument("--peak", action="store_true",
                   help="measure this device's peak FLOP/s (a large matmul) again and cache it for MFU")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of --peak (default: bfloat16 on CUDA, float32 on CPU)")
    b.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    pl = sub.add_parser("plan", help="predict peak memory per device, and the largest micro-batch that fits",
                        description="Predict the peak memory of the run CONFIG describes, per device, broken down "
                        "into weights, gradients, optimizer states, activations, logits and buffers, without "
                        "loading the model. See docs/plan.md.")
    pl.add_argument("config", help="YAML config file")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    pl.add_argument("--devices", type=int, default=1, help="data-parallel devices (processes on CPU)")
    pl.add_argument("--memory-gb", type=float,
                    help="memory per device (the whole machine on CPU); default: this machine's")
    pl.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3],
                    help="DeepSpeed ZeRO stage (0: DDP; default: what train.distributed says)")
    pl.add_argument("--fsdp2", action="store_true", default=None,
                    help="plan for FSDP2 (default: what train.distributed says)")
    pl.add_argument("--offload", action="store_true", default=None,
                    help="ZeRO CPU offload of the optimizer (and of parameters at stage 3; default: train.offload)")
    pl.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: this machine's)")
    pl.add_argument("--measure-data", action="store_true",
                    help="tokenize the data and plan for its heaviest micro-batch instead of max_length")
    pl.add_argument("--calibrate", action="store_true",
                    help="CPU: measure this machine's runtime baseline with a micro run (~15 s; cached)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    en = sub.add_parser("env", help="versions and hardware, for bug reports")
    en.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    cf = sub.add_parser("config", help="list every config key with its type, default and help")
    cf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    cf.add_argument("section", nargs="?", metavar="SECTION_OR_KEY",
                    help="only this section (model, data, adapter, method, train, output), or only the keys "
                    "matching a key name (train.lr, lr, smoothing)")
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but dotted overrides may also come after options (`CONFIG --rows 2 data.max_length=64`).

    argparse fills a positional `overrides` (nargs="*") only from the words right after the positional before it,
    and calls words after an option unrecognized; those are overrides too (parse_intermixed_args does not support
    subcommands). A word that starts with "-" stays an error."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(w.startswith("-") for w in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.parse_args(argv)  # argparse's own "unrecognized arguments" error (exit 2)
    return args


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts --local_rank=N before the subcommand; LOCAL_RANK in the environment says it too."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, _drop_local_rank(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 0
    key = args.command
    if key == "data":
        if not args.data_command:
            parser.parse_args(["data", "--help"])
        key = f"data {args.data_command}"
    if key == "eval":
        if not args.eval_command:
            parser.parse_args(["eval", "--help"])
        key = f"eval {args.eval_command}"
    debug = getattr(args, "debug", False)
    from tunelab.errors import Interrupted, UserError
    from tunelab.utils.env import drop_library_notices

    drop_library_notices()

    try:
        return COMMANDS[key](args)
    except UserError as e:
        if debug:  # the traceback too, but the exit code still says "your input" (2), not "a crash" (1)
            import traceback

            traceback.print_exc()
        print(f"error: {e.message}", file=sys.stderr)
        for line in e.details:
            print(f"  {line}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:  # a checkpoint was saved: say where, no traceback
        if debug:
            import traceback

            traceback.print_exc()
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
