import importlib.util
import sys
from pathlib import Path

import pytest

from clip.flops import PEAK_FLOPS, flops_per_sample
from clip.memory import GIB, count_parameters, estimate_memory
from clip.models import get_model_config

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


plan = _load_script("plan")
measure_memory = _load_script("measure_memory")


def test_split_global_batch():
    split = plan.split_global_batch(32768, 256)
    assert (split.local_batch, split.micro_batch, split.accum_steps) == (128, 128, 1)
    split = plan.split_global_batch(32768, 256, micro_batch=32)
    assert (split.local_batch, split.micro_batch, split.accum_steps) == (128, 32, 4)


def test_split_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"global batch 32768 is not divisible by 384 GPUs .*32640 or 33024"):
        plan.split_global_batch(32768, 384)
    with pytest.raises(ValueError, match=r"per-GPU batch 128 .* not divisible by micro-batch 48; divisors: 1, 2, 4, 8, 16, 32, 64, 128"):
        plan.split_global_batch(32768, 256, micro_batch=48)
    with pytest.raises(ValueError, match="micro-batch 256"):
        plan.split_global_batch(32768, 256, micro_batch=256)
    with pytest.raises(ValueError, match=r"GPU count \(0\)"):
        plan.split_global_batch(32768, 0)


def _run(name="ViT-L-14", **overrides):
    fields = dict(name=name, model=get_model_config(name), global_batch=32768, samples_seen=12.8e9)
    fields.update(overrides)
    return plan.RunConfig(**fields)


def test_choose_split_takes_the_largest_micro_batch_that_fits():
    run, cluster = _run("ViT-B-32"), plan.ClusterConfig(gpu="h100", num_gpus=64, memory_gib=12)
    params = count_parameters(run.model)
    split = plan.choose_split(run, cluster, params)
    assert split.local_batch == 512 and split.accum_steps > 1

    def total(micro_batch):
        return plan.plan_memory(run, cluster, plan.BatchSplit(512, micro_batch), False, params).total

    assert total(split.micro_batch) <= 12 * GIB < total(2 * split.micro_batch)
    with pytest.raises(ValueError, match="ViT-B-32 does not fit in 2 GiB even at micro-batch 1"):
        plan.choose_split(run, plan.ClusterConfig(gpu="h100", num_gpus=64, memory_gib=2), params)


def test_step_time_and_days():
    run, cluster = _run(), plan.ClusterConfig(gpu="h100", num_gpus=256)
    split = plan.split_global_batch(32768, 256)
    time = plan.estimate_step_time(run, cluster, split, mfu=0.4)
    flops_per_step = 32768 * 3 * flops_per_sample(run.model, global_batch=32768).forward_flops
    assert time.seconds == pytest.approx(flops_per_step / (256 * PEAK_FLOPS["h100-sxm"]["bf16"] * 0.4))
    assert time.num_steps == 390625  # 12.8e9 / 32768
    assert time.days == pytest.approx(time.seconds * 390625 / 86400)
    # Checkpointing and accumulation each add a forward's worth of executed work to the three.
    slower = plan.estimate_step_time(
        _run(grad_checkpointing=True), cluster, plan.split_global_batch(32768, 256, 64), mfu=0.4
    )
    assert slower.seconds == pytest.approx(time.seconds * 5 / 3)


def test_memory_components():
    cfg = get_model_config("ViT-B-32")
    params = count_parameters(cfg)
    assert params.total == 151_277_313  # OpenCLIP: 151.28M
    ddp = estimate_memory(cfg, micro_batch=64, local_batch=256, global_batch=32768, num_devices=128)
    fsdp = estimate_memory(cfg, micro_batch=64, local_batch=256, global_batch=32768, num_devices=128, parallel="fsdp")
    assert ddp.weights == ddp.gradients == 4 * params.total and ddp.optimizer == 8 * params.total
    assert fsdp.optimizer == ddp.optimizer / 128 and fsdp.gradients == ddp.gradients / 128
    assert ddp.logits == 24 * 256 * 32768  # plain [local, global] logits
    chunked = estimate_memory(cfg, micro_batch=64, local_batch=256, global_batch=32768, num_devices=128, loss_chunk_rows=32)
    assert chunked.logits == ddp.logits / 8
    # GradCache's feature cache exists only with accumulation.
    assert ddp.feature_cache > 0
    no_accum = estimate_memory(cfg, micro_batch=256, local_batch=256, global_batch=32768, num_devices=128)
    assert no_accum.feature_cache == 0 and no_accum.activations == 4 * ddp.activations
    checkpointed = estimate_memory(
        cfg, micro_batch=64, local_batch=256, global_batch=32768, num_devices=128, grad_checkpointing=True
    )
    assert checkpointed.activations < ddp.activations / 4


def test_cli_prints_a_plan(capsys):
    common = ["--model", "ViT-B-32", "--samples-seen", "12.8e9", "--num-gpus", "64"]
    plan.main(common + ["--global-batch", "32768", "--gpu", "a100", "--mfu", "0.25"])
    out = capsys.readouterr().out
    assert "global batch 32768 = 64 GPUs x 512 per GPU" in out
    assert "step time at 25% MFU (measured)" in out and "390625 steps" in out
    with pytest.raises(SystemExit) as error:
        plan.main(common + ["--global-batch", "1000", "--gpu", "h100"])
    assert error.value.code == 2
    assert "global batch 1000 is not divisible by 64 GPUs" in capsys.readouterr().err


def test_activation_estimate_matches_measured_cpu_memory():
    # Real forward + backward passes on CPU, each in a fresh subprocess (run concurrently to save
    # time): a full-width ViT under bf16 autocast, and a ResNet with per-stage checkpointing.
    cases = [measure_memory.Case.parse(text) for text in ("ViT-B-32:1:1:16:bf16:0", "tiny-resnet:0:0:32:bf16:1")]
    children = [measure_memory.start(case) for case in cases]
    for case, child in zip(cases, children):
        measured, estimated = measure_memory.finish(case, child), measure_memory.estimate(case)
        # What forward keeps for backward: the activation model (measured within 3% in docs/benchmarks.md).
        assert estimated["after_forward_mib"] == pytest.approx(measured["after_forward_mib"], rel=0.15), case
        # The peak estimate counts every gradient and every activation at once: an upper bound.
        assert 0.6 * estimated["peak_mib"] < measured["peak_mib"] < 1.05 * estimated["peak_mib"], case


def test_cli_plans_a_recipe_as_the_trainer_composes_it(capsys):
    cluster = ["--gpu", "h100", "--num-gpus", "256"]
    plan.main(["--recipe", "vit_l14", *cluster])
    out = capsys.readouterr().out
    assert out.startswith("ViT-L-14 (recipe vit_l14): 427.6M parameters, bf16, ddp")
    assert "global batch 32768 = 256 GPUs x 128 per GPU; micro-batch 128, 1 accumulation step(s)" in out
    assert "390625 steps to 1.28e+10 samples" in out  # max_steps x global batch
    assert "recomputation" not in out  # the recipe needs no activation checkpointing on 80 GB GPUs
    # Hydra overrides after the flags, type-checked like the trainer's.
    plan.main(["--recipe", "vit_l14", *cluster, "global_batch_size=65536", "grad_checkpointing=true", "max_steps=1000"])
    out = capsys.readouterr().out
    assert "65536 = 256 GPUs x 256 per GPU" in out and "(x1.33 for recomputation)" in out and "1000 steps" in out
    # 16 GPUs cannot hold 2048 pairs each: the plan names the micro-batch to add.
    plan.main(["--recipe", "vit_l14", "--gpu", "h100", "--num-gpus", "16"])
    assert "add micro_batch_size=" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "vit_l15"], "no recipe 'vit_l15'"),
        (["--recipe", "vit_l14", "--model", "ViT-B-32"], "--model cannot be combined with --recipe"),
        (["--recipe", "vit_l14", "optim.lrr=1"], "did you mean optim.lr?"),
        (["--recipe", "smoke"], "pass --samples-seen"),
        (["global_batch_size=8"], "overrides need --recipe"),
        (["--model", "ViT-B-32"], "required without --recipe: --global-batch, --samples-seen"),
        (["--model", "ViT-B16", "--global-batch", "64", "--samples-seen", "1e9"], "--model: unknown model 'ViT-B16'"),
    ],
)
def test_cli_recipe_errors_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        plan.main([*argv, "--gpu", "h100", "--num-gpus", "8"])
    assert error.value.code == 2 and message in capsys.readouterr().err
