"""The training loop in one process: checkpoints, resume, preemption, non-finite steps, logging.

Runs call clip.train.train in-process on a tiny model with in-memory data (tests/train_fixtures.py);
one reference run is shared by the tests that only read it. Subprocess and multi-process tests of
the real entry point are in tests/test_train_launch.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import signal

import pytest
import torch

import clip
import clip.checkpoint as ckpt
import clip.resume
import clip.step
import clip.train as train_module
from clip.config import ConfigError
from clip.models.weights import CheckpointMismatchError
from clip.optim import build_optimizer, get_lr
from clip.step import MAX_LOGIT_SCALE, NonFiniteLossError
from clip.train import train
from tests.train_fixtures import load_model_state, read_metrics, tiny_train_config, use_memory_data


@pytest.fixture(autouse=True)
def memory_data(monkeypatch):
    use_memory_data(monkeypatch)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """12 steps, checkpoints at 4, 8 and 12: the uninterrupted run others are compared with."""
    run_dir = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        use_memory_data(patch)
        result = train(tiny_train_config(run_dir))
    return run_dir, result


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _digest_tree(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_reference_run_learns_logs_and_checkpoints(reference_run):
    run_dir, result = reference_run
    assert result.step == 12 and not result.preempted
    events = [e for e in read_metrics(run_dir) if "train/loss" in e]
    assert [e["step"] for e in events] == list(range(1, 13))
    assert events[-1]["train/loss"] < events[0]["train/loss"] - 0.3
    assert {"train/lr", "train/logit_scale", "train/samples_per_s", "train/data_wait", "train/grad_norm"} <= events[0].keys()
    assert [step for step, _ in ckpt.list_committed(run_dir / "checkpoints")] == [4, 8, 12]
    state = torch.load(run_dir / "checkpoints" / "step-12" / "train_state.pt", weights_only=True)
    assert state["counters"]["step"] == 12 and state["counters"]["samples_seen"] == 12 * 16
    assert "model.name: tiny-vit" not in state["config"] and '"name": "tiny-vit"' in state["config"]
    assert (run_dir / "config.yaml").read_text().count("tiny-vit") == 1
    assert not (run_dir / ".hydra").exists()


def test_preemption_checkpoints_the_current_step_and_the_rerun_matches_the_reference(tmp_path, reference_run):
    preempted = train(tiny_train_config(tmp_path, "fault.signal_at_step=6"))
    assert preempted.preempted and preempted.step == 6
    assert ckpt.find_latest(tmp_path / "checkpoints").name == "step-6"
    resumed = train(tiny_train_config(tmp_path))
    assert resumed.step == 12 and not resumed.preempted
    _assert_same_tensors(load_model_state(tmp_path / "checkpoints" / "step-12"),
                         load_model_state(reference_run[0] / "checkpoints" / "step-12"))
    steps = [e["step"] for e in read_metrics(tmp_path) if "train/loss" in e]
    assert steps == list(range(1, 13))  # the resumed run goes on at step 7, never backwards


def test_sigusr1_preempts_like_sigterm_and_the_handlers_are_restored(tmp_path, monkeypatch):
    # Preemption: SLURM's `--signal=USR1@90` warning. Sent by the process to itself during step 3.
    real_forward_backward = clip.step.forward_backward
    calls = []

    def forward_backward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_forward_backward(*args, **kwargs)

    monkeypatch.setattr(clip.step, "forward_backward", forward_backward)
    saved_steps = []
    real_save_checkpoint = clip.resume.save_checkpoint

    def save_checkpoint(checkpoint_dir, step, *args, **kwargs):
        saved_steps.append(step)
        return real_save_checkpoint(checkpoint_dir, step, *args, **kwargs)

    monkeypatch.setattr(clip.resume, "save_checkpoint", save_checkpoint)
    ignore = signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # should the trainer not catch it
    try:
        before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
        result = train(tiny_train_config(tmp_path))
    finally:
        after = {signum: signal.getsignal(signum) for signum in before}
        signal.signal(signal.SIGUSR1, ignore)
    assert result.preempted and result.step == 3
    assert ckpt.find_latest(tmp_path / "checkpoints").name == "step-3"
    assert saved_steps == [3]  # once: the stop's checkpoint is not written again after the loop
    assert after == before


def test_a_stop_agreed_while_a_new_epoch_starts_still_checkpoints_the_last_step(tmp_path, monkeypatch):
    # Preemption: the ranks exchange flags again when an epoch ends (16 steps of 16 here); a signal that lands
    # just before that exchange stops the run there, with the last step saved like any other stop.
    real_exchange = train_module.exchange_host_flags
    had_batch = []

    def exchange_host_flags(has_batch, stop):
        epoch_restart = bool(had_batch) and not had_batch[-1]
        had_batch.append(has_batch)
        return real_exchange(has_batch, stop or epoch_restart)

    monkeypatch.setattr(train_module, "exchange_host_flags", exchange_host_flags)
    result = train(tiny_train_config(tmp_path, "max_steps=20", "checkpoint.every_steps=0", "log.every_steps=100",
                                     "fault.nan_at_steps=[16]"))  # fmt: skip
    assert result.preempted and result.step == 16
    assert ckpt.find_latest(tmp_path / "checkpoints").name == "step-16"
    # Step 16, unread when the stop was agreed, is still accounted before its checkpoint: it was skipped.
    state = torch.load(tmp_path / "checkpoints" / "step-16" / "train_state.pt", weights_only=True)
    assert state["counters"]["nonfinite_steps"] == state["counters"]["consecutive_nonfinite"] == 1
    # Resumed at the epoch's end: the first batch comes from the next epoch, on every rank at once.
    monkeypatch.setattr(train_module, "exchange_host_flags", real_exchange)
    resumed = train(tiny_train_config(tmp_path, "max_steps=20", "checkpoint.every_steps=0", "log.every_steps=100",
                                      "fault.nan_at_steps=[16]"))  # fmt: skip
    assert not resumed.preempted and resumed.step == 20
    assert [e["train/epoch"] for e in read_metrics(tmp_path) if "train/loss" in e] == [1]  # step 20, logged


def test_periodic_zero_shot_evaluation_runs_at_its_steps_and_once_at_the_last(tmp_path):
    from tests.eval_fixtures import write_image_folder

    write_image_folder(tmp_path / "eval", num_classes=3, per_class=2)
    train(tiny_train_config(tmp_path / "run", "max_steps=4", "eval.every_steps=2", f"eval.zero_shot=[{tmp_path / 'eval'}]"))
    evaluated = [e["step"] for e in read_metrics(tmp_path / "run") if any(key.startswith("eval/") for key in e)]
    assert evaluated == [2, 4]  # the last step's evaluation is the final one, not a second periodic one


def test_a_resumed_run_replays_the_random_state_of_the_uninterrupted_one(tmp_path):
    # Bitwise resume: patch dropout draws from the trainer's RNG every step, so a resume that did not restore
    # the checkpointed RNG state would drop other patches than the uninterrupted run.
    dropout = ["model.vision.patch_dropout=0.5", "max_steps=8"]
    train(tiny_train_config(tmp_path / "reference", *dropout))
    assert train(tiny_train_config(tmp_path / "run", *dropout, "fault.signal_at_step=6")).step == 6
    train(tiny_train_config(tmp_path / "run", *dropout))
    _assert_same_tensors(load_model_state(tmp_path / "run" / "checkpoints" / "step-8"),
                         load_model_state(tmp_path / "reference" / "checkpoints" / "step-8"))


def test_a_resumed_fp16_run_keeps_its_loss_scale(tmp_path):
    # Bitwise resume: skipped steps (the injected one at step 2, and any fp16 overflow) lower the loss scale
    # from its initial 2**16; the resumed run must go on with the lowered one.
    fp16 = ["precision=fp16", "deterministic=false", "max_steps=8", "fault.nan_at_steps=[2]"]
    train(tiny_train_config(tmp_path / "reference", *fp16))
    assert train(tiny_train_config(tmp_path / "run", *fp16, "fault.signal_at_step=6")).step == 6
    train(tiny_train_config(tmp_path / "run", *fp16))
    states = [torch.load(tmp_path / run / "checkpoints" / "step-8" / "train_state.pt", weights_only=True)
              for run in ("reference", "run")]
    assert states[0]["scaler"]["scale"] == states[1]["scaler"]["scale"] < 2.0**16
    _assert_same_tensors(states[0]["model"], states[1]["model"])


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    # The run ends at step 5, so that step is checkpointed (a skipped step is not, periodically).
    result = train(tiny_train_config(tmp_path, "fault.nan_at_steps=[5]", "checkpoint.every_steps=1", "max_steps=5"))
    assert result.step == 5
    states = {step: load_model_state(tmp_path / "checkpoints" / f"step-{step}") for step in (3, 4, 5)}
    _assert_same_tensors(states[4], states[5])  # the skipped step changed nothing
    assert not torch.equal(states[3]["visual.proj"], states[4]["visual.proj"])  # while steps before did
    assert read_metrics(tmp_path)[-1]["train/nonfinite_steps"] == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_skipped_step_leaves_parameters_and_moments_untouched_without_a_host_read(tmp_path, monkeypatch, precision):
    # No step here is logged or checkpointed, so the host reads step 3's verdict only during step 4:
    # the skip itself happens on the device (fused AdamW's found_inf), in every precision.
    real_apply_update = clip.step.apply_update
    after: list[tuple[dict, dict]] = []  # per step: parameters, AdamW moments

    def recorded_apply_update(model, optimizer, scaler, *, skip):
        real_apply_update(model, optimizer, scaler, skip=skip)
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        moments = {f"{id(p)}.{key}": v.clone() for p, state in optimizer.state.items() for key, v in state.items()}
        after.append((params, moments))

    monkeypatch.setattr(clip.step, "apply_update", recorded_apply_update)
    train(tiny_train_config(tmp_path, f"precision={precision}", "deterministic=false", "fault.nan_at_steps=[3]",
                            "max_steps=4", "checkpoint.every_steps=0", "log.every_steps=4"))  # fmt: skip
    (params_1, _), (params_2, moments_2), (params_3, moments_3), (params_4, _) = after
    _assert_same_tensors(params_2, params_3)
    _assert_same_tensors(moments_2, moments_3)  # step counts included
    assert not torch.equal(params_1["visual.proj"], params_2["visual.proj"])  # while a finite step does update
    assert not torch.equal(params_3["visual.proj"], params_4["visual.proj"])
    metrics = read_metrics(tmp_path)[-1]
    nonfinite = metrics["train/nonfinite_steps"]
    assert nonfinite == 1 if precision != "fp16" else nonfinite >= 1  # fp16: the loss scale's overflows count too
    if precision == "fp16":  # every skipped step halves the loss scale once, the injected one included
        assert metrics["train/loss_scale"] == 2.0**16 * 0.5**nonfinite


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_an_infinite_loss_or_gradient_is_skipped_too(tmp_path, monkeypatch, where):
    real_forward_backward = clip.step.forward_backward
    calls = []

    def forward_backward(model, *args, **kwargs):
        calls.append(1)
        loss = real_forward_backward(model, *args, **kwargs)
        if len(calls) == 3 and where == "gradient":  # a finite loss whose gradient overflowed
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        return loss + float("inf") if len(calls) == 3 and where == "loss" else loss

    monkeypatch.setattr(clip.step, "forward_backward", forward_backward)
    train(tiny_train_config(tmp_path, "max_steps=3", "checkpoint.every_steps=1"))
    _assert_same_tensors(load_model_state(tmp_path / "checkpoints" / "step-2"),
                         load_model_state(tmp_path / "checkpoints" / "step-3"))
    assert read_metrics(tmp_path)[-1]["train/nonfinite_steps"] == 1


@pytest.mark.parametrize("every", [1, 4])
def test_repeated_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, every):
    # every=1: checkpoints are due at every step, but skipped steps 5 and 6 are not checkpointed.
    # every=4: step 7 is read during step 8, which the run stops before checkpointing.
    with pytest.raises(NonFiniteLossError, match=r"steps 5-7 on rank\(s\) \[0\].*last good checkpoint: step-4"):
        train(tiny_train_config(tmp_path, "fault.nan_at_steps=[5,6,7]", f"checkpoint.every_steps={every}"))
    latest = ckpt.find_latest(tmp_path / "checkpoints")
    assert latest.name == "step-4"
    assert all(torch.isfinite(t).all() for t in load_model_state(latest).values())


def test_non_finite_steps_stop_the_run_only_when_consecutive_or_too_many(tmp_path):
    nan_steps = "fault.nan_at_steps=[3,5,7]"
    assert train(tiny_train_config(tmp_path / "a", nan_steps, "max_steps=8")).step == 8  # a good step resets the streak
    assert read_metrics(tmp_path / "a")[-1]["train/nonfinite_steps"] == 3
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at 3 steps in total"):
        train(tiny_train_config(tmp_path / "b", nan_steps, "max_steps=8", "nan.max_total=3"))


def test_a_non_finite_parameter_or_optimizer_moment_is_never_checkpointed():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    clip.resume.assert_finite_state(model, optimizer, step=1)
    optimizer.state[model.bias]["exp_avg_sq"][0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 2: optimizer exp_avg_sq holds non-finite values"):
        clip.resume.assert_finite_state(model, optimizer, step=2)
    optimizer.state[model.bias]["exp_avg_sq"].zero_()
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="step 3: parameter weight holds non-finite values"):
        clip.resume.assert_finite_state(model, optimizer, step=3)


def test_startup_removes_the_leftovers_of_interrupted_saves_and_deletions(tmp_path):
    # Atomic checkpoints: a kill mid-save leaves `step-N.tmp`, a kill mid-retention `step-N.deleting`; a relaunch
    # removes them even when it never saves step N again.
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-99.tmp").mkdir(parents=True)
    (checkpoints / "step-3.deleting").mkdir()
    train(tiny_train_config(tmp_path, "max_steps=1"))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-1"]


def test_resume_never_refuses_a_run_dir_with_checkpoints_and_changes_nothing(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run[0], run_dir)
    before = _digest_tree(run_dir)
    with pytest.raises(ConfigError, match=rf"run dir {run_dir} already has checkpoints up to step 12"):
        train(tiny_train_config(run_dir, "checkpoint.resume=never"))
    assert _digest_tree(run_dir) == before


def test_resume_with_a_path_that_does_not_exist_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.resume=/nonexistent/step-4: no such checkpoint"):
        train(tiny_train_config(tmp_path, "checkpoint.resume=/nonexistent/step-4"))
    assert not (tmp_path / "checkpoints").exists()


def test_a_missing_zero_shot_set_is_a_config_error_before_the_run_directory(tmp_path):
    # Config errors first: a typo in eval.zero_shot used to surface as a traceback after config.yaml and
    # checkpoints/ were written.
    missing = tmp_path / "imagenet" / "val"
    with pytest.raises(ConfigError, match=rf"eval.zero_shot: eval data {missing} is not a directory"):
        train(tiny_train_config(tmp_path / "run", f"eval.zero_shot=[{missing}]"))
    assert not (tmp_path / "run").exists()


def test_two_zero_shot_sets_with_one_name_are_a_config_error_before_the_run_directory(tmp_path):
    # Both would log eval/heldout_top1: the second would silently overwrite the first.
    from tests.eval_fixtures import write_image_folder

    for root in ("a", "b"):
        write_image_folder(tmp_path / root / "heldout", num_classes=2, per_class=1)
    sets = f"[{tmp_path / 'a' / 'heldout'},{tmp_path / 'b' / 'heldout'}]"
    with pytest.raises(ConfigError, match=r"eval.zero_shot: two eval sets are named 'heldout' .* name them, as name=path"):
        train(tiny_train_config(tmp_path / "run", f"eval.zero_shot={sets}"))
    assert not (tmp_path / "run").exists()
    named = f"['a={tmp_path / 'a' / 'heldout'}','b={tmp_path / 'b' / 'heldout'}']"
    train(tiny_train_config(tmp_path / "run", "max_steps=1", f"eval.zero_shot={named}"))
    final = read_metrics(tmp_path / "run")[-1]
    assert final["eval/a_num_samples"] == final["eval/b_num_samples"] == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.text.tokenizer={missing}", r"model.text.tokenizer: tokenizer file '{missing}' does not exist"),
        ("checkpoint.init_from={missing}", r"checkpoint.init_from={missing}: no such file or directory"),
    ],
)
def test_a_missing_tokenizer_or_init_file_is_a_config_error_before_the_run_directory(tmp_path, override, message):
    missing = str(tmp_path / "nothere.json")
    with pytest.raises(ConfigError, match=message.format(missing=missing)):
        train(tiny_train_config(tmp_path / "run", override.format(missing=missing)))
    assert not (tmp_path / "run").exists()


def test_init_from_is_not_needed_once_the_run_has_its_own_checkpoints(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run[0], run_dir)
    train(tiny_train_config(run_dir, f"checkpoint.init_from={tmp_path / 'deleted-since.safetensors'}"))


def test_resume_refuses_semantic_config_changes_unless_allowed(tmp_path, reference_run, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run[0], run_dir)
    with pytest.raises(ConfigError, match="global_batch_size: 16 -> 32"):
        train(tiny_train_config(run_dir, "global_batch_size=32"))
    with caplog.at_level(logging.INFO, logger="clip.train"):
        train(tiny_train_config(run_dir, "global_batch_size=32", "checkpoint.allow_config_change=[global_batch_size]"))
        assert "accepted config changes: global_batch_size: 16 -> 32" in caplog.text
        train(tiny_train_config(run_dir, "log.every_steps=5"))
        assert "changed settings: log.every_steps: 1 -> 5" in caplog.text


def test_resume_from_another_runs_checkpoint_then_from_its_own(tmp_path, reference_run, caplog):
    source = reference_run[0] / "checkpoints" / "step-8"
    with caplog.at_level(logging.INFO, logger="clip.train"):
        result = train(tiny_train_config(tmp_path, f"checkpoint.resume={source}"))
    assert f"resuming from {source} at step 8" in caplog.text
    assert result.step == 12
    _assert_same_tensors(load_model_state(tmp_path / "checkpoints" / "step-12"),
                         load_model_state(reference_run[0] / "checkpoints" / "step-12"))


def test_logit_scale_is_clamped_after_every_step_and_on_load(tmp_path, reference_run, caplog):
    train(tiny_train_config(tmp_path / "a", "model.init_logit_scale=10.0", "optim.lr=10", "optim.warmup_steps=0",
                            "max_steps=1", "optim.grad_clip_norm=0"))
    ln_100 = torch.tensor(MAX_LOGIT_SCALE).item()  # in float32, the parameter's precision
    state = load_model_state(tmp_path / "a" / "checkpoints" / "step-1")
    assert state["logit_scale"].item() <= ln_100

    # A checkpoint whose logit_scale is 7 (written by other code) is clamped when it is loaded.
    source = reference_run[0] / "checkpoints" / "step-12"
    train_state, rank_state = ckpt.load_checkpoint(source, rank=0)
    train_state["model"]["logit_scale"] = torch.tensor(7.0)
    ckpt.save_checkpoint(tmp_path / "b" / "checkpoints", 12, train_state, rank_state, rank=0, keep_last=2,
                         manifest_extra={})
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        train(tiny_train_config(tmp_path / "b", "max_steps=13", "checkpoint.allow_config_change=[max_steps]"))
    assert "logit_scale 7.0000 is outside [0, ln 100]: clamped" in caplog.text
    assert load_model_state(tmp_path / "b" / "checkpoints" / "step-13")["logit_scale"].item() <= ln_100

    # And one below 0 (a temperature above 1) is raised to 0, on load and after the step.
    train_state["model"]["logit_scale"] = torch.tensor(-1.0)
    ckpt.save_checkpoint(tmp_path / "c" / "checkpoints", 12, train_state, rank_state, rank=0, keep_last=2,
                         manifest_extra={})
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        train(tiny_train_config(tmp_path / "c", "max_steps=13", "checkpoint.allow_config_change=[max_steps]"))
    assert "logit_scale -1.0000 is outside [0, ln 100]: clamped" in caplog.text
    assert load_model_state(tmp_path / "c" / "checkpoints" / "step-13")["logit_scale"].item() >= 0.0


def test_resume_with_another_world_size_is_refused(tmp_path, reference_run):
    # Safe config changes on resume: in exact-data mode the data position belongs to the world size it was saved with.
    train_state, rank_state = ckpt.load_checkpoint(reference_run[0] / "checkpoints" / "step-12", rank=0)
    train_state["world_size"] = 2
    ckpt.save_checkpoint(tmp_path / "checkpoints", 12, train_state, rank_state, rank=0, keep_last=2, manifest_extra={})
    with pytest.raises(ConfigError, match=r"world_size: 2 -> 1"):
        train(tiny_train_config(tmp_path, "max_steps=13", "checkpoint.allow_config_change=[max_steps]"))


def test_a_locked_tower_does_not_change(tmp_path):
    train(tiny_train_config(tmp_path, "lock_image=true", "max_steps=2", "checkpoint.every_steps=1"))
    first, last = (load_model_state(tmp_path / "checkpoints" / f"step-{s}") for s in (1, 2))
    visual = [key for key in first if key.startswith("visual.")]
    assert visual and all(torch.equal(first[key], last[key]) for key in visual)
    assert not torch.equal(first["text_projection"], last["text_projection"])


def test_weight_decay_spares_gains_biases_class_token_and_temperature():
    from clip.config import OptimConfig
    from clip.models import CLIP, get_model_config

    model = CLIP(get_model_config("tiny-vit"))
    decay, no_decay, scalars = build_optimizer(model, OptimConfig(weight_decay=0.2)).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"] + scalars["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == scalars["weight_decay"] == 0.0
    assert {"logit_scale", "visual.class_embedding", "ln_final.weight", "ln_final.bias",
            "visual.transformer.resblocks.0.attn.in_proj_bias"} <= spared
    assert {"visual.positional_embedding", "positional_embedding", "token_embedding.weight", "visual.conv1.weight",
            "text_projection", "visual.proj"} <= decayed
    assert len(decayed) + len(spared) == len(list(model.parameters()))


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine():
    from clip.config import OptimConfig

    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr=0.1)
    assert get_lr(1, cfg, 110) == pytest.approx(0.1) and get_lr(10, cfg, 110) == pytest.approx(1.0)
    assert get_lr(11, cfg, 110) == pytest.approx(1.0)
    assert get_lr(61, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert get_lr(111, cfg, 110) == pytest.approx(0.1)
    assert 0.1 < get_lr(110, cfg, 110) < 0.101
    assert get_lr(50, OptimConfig(lr=1.0, warmup_steps=10, schedule="constant"), 110) == 1.0


def test_tracker_failures_never_change_training(tmp_path, reference_run, caplog):
    class FailingInit:
        def __init__(self, **kwargs):
            raise ConnectionError("no network")

    class FailingLog:
        def __init__(self, **kwargs):
            self.calls = 0

        def log(self, metrics, step):
            if step == 3:
                raise RuntimeError("server error")
            if step == 5:
                import time

                time.sleep(600)  # a hung tracker: the trainer must not wait for it

        def finish(self):
            pass

    for name, tracker in [("init", FailingInit), ("log", FailingLog)]:
        run_dir = tmp_path / name
        with caplog.at_level(logging.WARNING, logger="clip.logger"):
            original = train_module.MetricsLogger.__init__

            def init_with_fake(self, *args, tracker=tracker, **kwargs):
                original(self, *args, tracker_factory=tracker, **kwargs)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(train_module.MetricsLogger, "__init__", init_with_fake)
                patch.setattr("clip.logger._CLOSE_TIMEOUT_S", 1.0)
                train(tiny_train_config(run_dir, "log.wandb=offline"))
        assert [e["step"] for e in read_metrics(run_dir) if "train/loss" in e] == list(range(1, 13))
        _assert_same_tensors(load_model_state(run_dir / "checkpoints" / "step-12"),
                             load_model_state(reference_run[0] / "checkpoints" / "step-12"))
    assert "tracker init failed (ConnectionError: no network)" in caplog.text
    assert "tracker log failed 1 time(s): RuntimeError: server error" in caplog.text


def test_no_secret_from_the_environment_reaches_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sk-test-XYZ")
    logged_configs = []

    class RecordingTracker:
        def __init__(self, **kwargs):
            logged_configs.append(repr(kwargs))

        def log(self, metrics, step):
            pass

        def finish(self):
            pass

    original = train_module.MetricsLogger.__init__
    monkeypatch.setattr(train_module.MetricsLogger, "__init__",
                        lambda self, *a, **k: original(self, *a, tracker_factory=RecordingTracker, **k))
    train(tiny_train_config(tmp_path, "log.wandb=offline", "max_steps=2"))
    assert logged_configs and "sk-test-XYZ" not in logged_configs[0]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"sk-test-XYZ" not in path.read_bytes(), path


def test_batch_plan_is_derived_from_the_global_batch(tmp_path):
    from clip.config import get_batch_plan

    cfg = tiny_train_config(tmp_path, "global_batch_size=32", "micro_batch_size=4")
    assert get_batch_plan(cfg, world_size=2) == (16, 4)
    with pytest.raises(ConfigError, match="global_batch_size=32 is not divisible by the world size 3"):
        get_batch_plan(cfg, world_size=3)
    with pytest.raises(ConfigError, match="micro_batch_size=4 does not divide the per-device batch 2"):
        get_batch_plan(cfg, world_size=16)
    assert math.isfinite(MAX_LOGIT_SCALE)


def test_the_export_loads_with_clip_load_and_holds_the_final_weights(reference_run):
    run_dir, _ = reference_run
    model, _ = clip.load(str(run_dir / "model.safetensors"), device="cpu")
    final = load_model_state(run_dir / "checkpoints" / "step-12")
    _assert_same_tensors({key: value for key, value in model.state_dict().items()}, final)


def test_init_from_starts_a_new_run_and_is_ignored_when_resuming(tmp_path, reference_run, caplog):
    export = reference_run[0] / "model.safetensors"
    with caplog.at_level(logging.INFO, logger="clip.train"):
        train(tiny_train_config(tmp_path, f"checkpoint.init_from={export}", "max_steps=1", "optim.lr=1e-9",
                                "optim.warmup_steps=0"))
        assert f"initialised weights from export {export}" in caplog.text
        started = load_model_state(tmp_path / "checkpoints" / "step-1")
        for key, value in load_model_state(reference_run[0] / "checkpoints" / "step-12").items():
            torch.testing.assert_close(started[key], value, rtol=0, atol=1e-6)
        train(tiny_train_config(tmp_path, f"checkpoint.init_from={export}", "max_steps=1", "optim.lr=1e-9",
                                "optim.warmup_steps=0"))
        assert "at step 1 (init_from ignored)" in caplog.text


def test_init_from_another_architecture_fails_before_loading_tensors(tmp_path, reference_run):
    source = reference_run[0] / "checkpoints" / "step-12"
    with pytest.raises(CheckpointMismatchError, match=r"model.vision.width=64.*current config has 128"):
        train(tiny_train_config(tmp_path, f"checkpoint.init_from={source}", "model.vision.width=128"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train(tmp_path, precision):
    train(tiny_train_config(tmp_path, f"precision={precision}", "max_steps=4", "deterministic=false"))
    events = [e for e in read_metrics(tmp_path) if "train/loss" in e]
    assert all(math.isfinite(e["train/loss"]) for e in events) and events[-1]["train/loss"] < events[0]["train/loss"]
    assert ("train/loss_scale" in events[-1]) == (precision == "fp16")


def test_activation_checkpointing_does_not_change_the_result(tmp_path, reference_run):
    train(tiny_train_config(tmp_path, "grad_checkpointing=true"))
    _assert_same_tensors(load_model_state(tmp_path / "checkpoints" / "step-12"),
                         load_model_state(reference_run[0] / "checkpoints" / "step-12"))


def test_the_siglip_recipe_trains_its_bias(tmp_path):
    train(tiny_train_config(tmp_path, "loss=siglip", "max_steps=4", "checkpoint.every_steps=1"))
    events = [e for e in read_metrics(tmp_path) if "train/loss" in e]
    assert events[-1]["train/loss"] < events[0]["train/loss"]
    before, after = (load_model_state(tmp_path / "checkpoints" / f"step-{s}") for s in (3, 4))
    assert before["logit_bias"].item() != after["logit_bias"].item()
