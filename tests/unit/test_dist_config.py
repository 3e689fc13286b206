"""train.distributed / train.offload and the DeepSpeed and accelerate config files a user already has: what agrees
is used, what disagrees is refused in one line naming the key; the share-out of checkpoint tensors."""

from __future__ import annotations

import json

import pytest
import yaml

from tunelab.config.schema import TrainConfig
from tunelab.engine.dist_config import deepspeed_config, resolve_engine
from tunelab.engine.engines import owners
from tunelab.errors import ConfigError, UserError


def _train(**kw) -> TrainConfig:
    cfg = TrainConfig(**{"batch_size": 2, "grad_accum": 4, **kw})
    cfg.validate("train")
    return cfg


def _ds_file(tmp_path, data) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_deepspeed_file_that_agrees_passes_its_own_knobs_through(tmp_path):
    path = _ds_file(tmp_path, {"zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 1234},
                               "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4,
                               "bf16": {"enabled": "auto"}})
    tcfg = _train(distributed="zero3", deepspeed=path, max_grad_norm=0.5)
    spec = resolve_engine(tcfg, precision="fp32", world=2)
    assert (spec.name, spec.zero_stage) == ("zero3", 3)
    built = deepspeed_config(spec, tcfg, "fp32", 2)
    assert built["zero_optimization"]["reduce_bucket_size"] == 1234 and built["zero_optimization"]["overlap_comm"]
    assert built["train_micro_batch_size_per_gpu"] == 2 and built["gradient_accumulation_steps"] == 4
    assert built["train_batch_size"] == 16 and built["gradient_clipping"] == 0.5
    assert built["bf16"]["enabled"] is False  # tunelab's autocast does the mixed precision


def test_deepspeed_buckets_left_out_or_auto_are_sized_to_the_model(tmp_path):
    """DeepSpeed's own bucket defaults (5e8, 5e7 elements, 1e9 live parameters) hold every gradient and parameter of
    a model under ~1B parameters: tunelab sizes what a file leaves out, or sets to "auto", by the hidden size."""
    path = _ds_file(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1234,
                                                     "stage3_prefetch_bucket_size": "auto"}})
    tcfg = _train(distributed="zero3", deepspeed=path)
    zero = deepspeed_config(resolve_engine(tcfg, precision="fp32", world=2), tcfg, "fp32", 2, hidden=64)[
        "zero_optimization"]
    assert zero["reduce_bucket_size"] == 1234  # the file's own value
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 30 * 64 * 64
    plain = _train(distributed="zero2")
    zero = deepspeed_config(resolve_engine(plain, precision="fp32", world=2), plain, "fp32", 2, hidden=64)[
        "zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage"] == 2
    unknown = deepspeed_config(resolve_engine(plain, precision="fp32", world=2), plain, "fp32", 2)
    assert "reduce_bucket_size" not in unknown["zero_optimization"]  # no hidden size: DeepSpeed's defaults


@pytest.mark.parametrize("data, key", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage is 2, but the tunelab config says 3"),
    ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps is 8, but the tunelab config says 4"),
    ({"train_batch_size": 32}, "train_batch_size is 32, but batch_size 2 x grad_accum 4 x 2 processes is 16"),
    ({"gradient_clipping": 2.0}, "gradient_clipping is 2.0, but the tunelab config says 1.0 (train.max_grad_norm)"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer.device is 'cpu', but the tunelab config says 'none' (train.offload)"),
    ({"bf16": {"enabled": True}}, "bf16.enabled is True, but the tunelab config says False (train.precision)"),
    ({"optimizer": {"type": "Adam"}}, "has a 'optimizer' section; tunelab's optimizer is train.optimizer"),
    ({"zero_optimization": {"offload_param": {"device": "nvme"}}}, "NVMe offload is not supported"),
])
def test_a_deepspeed_file_that_disagrees_is_refused_naming_the_key(tmp_path, data, key):
    path = _ds_file(tmp_path, data)
    with pytest.raises(UserError) as e:
        resolve_engine(_train(distributed="zero3", deepspeed=path), precision="fp32", world=2)
    assert key in e.value.message and path in e.value.message


def test_a_missing_or_broken_deepspeed_file_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_engine(_train(distributed="zero2", deepspeed=str(tmp_path / "no.json")), precision="fp32", world=2)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        resolve_engine(_train(distributed="zero2", deepspeed=str(bad)), precision="fp32", world=2)


def _acc_file(tmp_path, data) -> str:
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_an_accelerate_fsdp2_config_gives_its_layer_classes(tmp_path):
    path = _acc_file(tmp_path, {"distributed_type": "FSDP", "mixed_precision": "no", "num_processes": 2,
                                "fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": False,
                                                "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}})
    spec = resolve_engine(_train(distributed="fsdp2", accelerate_config=path), precision="fp32", world=2)
    assert spec.name == "fsdp2" and spec.layer_classes == ("LlamaDecoderLayer",)
    assert spec.reshard_after_forward is False


def test_an_accelerate_deepspeed_config_agrees_or_is_refused(tmp_path):
    data = {"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2, "offload_optimizer_device": "cpu",
                                                                 "gradient_accumulation_steps": 4}}
    path = _acc_file(tmp_path, data)
    spec = resolve_engine(_train(distributed="zero2", offload="optimizer", accelerate_config=path),
                          precision="fp32", world=2)
    assert (spec.name, spec.offload) == ("zero2", "optimizer")
    with pytest.raises(UserError, match="mean train.offload optimizer, but the tunelab config says none"):
        resolve_engine(_train(distributed="zero2", accelerate_config=path), precision="fp32", world=2)
    with pytest.raises(UserError, match="means train.distributed zero2, but the tunelab config says zero3"):
        resolve_engine(_train(distributed="zero3", offload="optimizer", accelerate_config=path), precision="fp32",
                       world=2)


@pytest.mark.parametrize("data, message", [
    ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 1}}, "tunelab runs FSDP2"),
    ({"distributed_type": "MULTI_GPU", "mixed_precision": "bf16"}, "mixed_precision is bf16, but the run's"),
    ({"distributed_type": "MULTI_GPU", "num_processes": 8}, "num_processes is 8, but 2 processes were launched"),
    ({"distributed_type": "TPU"}, "distributed_type TPU is not one tunelab runs"),
])
def test_an_accelerate_config_that_disagrees_is_refused(tmp_path, data, message):
    with pytest.raises(UserError, match=message):
        resolve_engine(_train(distributed="ddp", accelerate_config=_acc_file(tmp_path, data)), precision="fp32",
                       world=2)


@pytest.mark.parametrize("kw, message", [
    ({"offload": "optimizer"}, "train.offload: optimizer offloads sharded states"),
    ({"distributed": "zero2", "offload": "optimizer+params"}, "needs sharded parameters"),
    ({"distributed": "fsdp2", "offload": "optimizer"}, "fsdp2 offloads parameters, gradients and optimizer states"),
    ({"deepspeed": "ds.json"}, "a DeepSpeed config needs train.distributed zero1"),
    ({"distributed": "zero3", "optimizer": "adamw_8bit"}, "adamw_8bit keeps states the sharded engines cannot"),
])
def test_config_rules_of_the_engines(kw, message):
    with pytest.raises(ConfigError, match=message):
        _train(**kw)


def test_checkpoint_tensors_are_shared_out_by_size():
    # the largest first, each to the least loaded rank: 10 | 6+3 | 5+4 for [10, 6, 5, 4, 3] on 3 ranks
    assert owners([10, 6, 5, 4, 3], 3) == [0, 1, 2, 2, 1]
    assert owners([1, 1, 1, 1], 1) == [0, 0, 0, 0]
    load = [0, 0]
    for size, rank in zip(sizes := [7, 7, 3, 2, 2, 1], owners(sizes, 2)):
        load[rank] += size
    assert load == [11, 11]


def test_the_deepspeed_launchers_local_rank_is_accepted_anywhere():
    from tunelab.cli import _drop_local_rank

    assert _drop_local_rank(["--local_rank=1", "train", "c.yaml", "train.lr=1e-3"]) == ["train", "c.yaml",
                                                                                        "train.lr=1e-3"]
    assert _drop_local_rank(["train", "c.yaml", "--local-rank", "0", "--nproc", "2"]) == ["train", "c.yaml",
                                                                                          "--nproc", "2"]
