"""The shared training engine on toy problems (CPU): schedules, AMP, accumulation, exact resume, NaN stop, EMA."""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from toy_training import ToyImages, bce_step, parse, toy_model

from core import checkpoint, engine, parallel, precision, runlog, runtime
from core.ema import ModelEMA
from core.engine import context as engine_context
from core.engine import loop as engine_loop
from core.errors import WSSSError
from core.optim import PolyLR
from core.precision import ComputeFormat

pytestmark = pytest.mark.torch_threads(1)


def start(models_dir: Path, args: argparse.Namespace, dataset: Dataset, model: nn.Module, ema: bool = False):
    run = runtime.setup(args, "test", models_dir=models_dir)
    loader = engine.build_loader(dataset, run, train=True)
    ctx = engine.TrainContext(run, len(loader))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    ctx.add(
        "cg", model, optimizer, PolyLR(optimizer, ctx.total_optimizer_steps), max_grad_norm=args.max_grad_norm, ema=ema
    )
    return run, loader, ctx


def train(models_dir: Path, args: argparse.Namespace, dataset: Dataset, model: nn.Module, step_fn=bce_step, ema=False):
    run, loader, ctx = start(models_dir, args, dataset, model, ema)
    try:
        return engine.fit(ctx, loader, step_fn), ctx
    finally:
        run.close()


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_flags_have_reference_defaults_and_both_spellings():
    args = parse("t", "--batch-size", "8", "--max_grad_norm", "none", "--accumulate-steps", "2")
    assert (args.batch_size, args.accumulate_steps, args.max_epoch, args.lr, args.wd) == (8, 2, 15, 0.1, 1e-4)
    assert args.optimizer == "sgd" and args.accumulate_mean is False and args.max_grad_norm is None
    assert args.validate_thresholds == pytest.approx([0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45])
    parser = argparse.ArgumentParser()
    engine.add_training_args(parser, batch_size=16, accumulate_steps=2)
    assert parser.parse_args([]).batch_size == 16 and parser.parse_args([]).accumulate_steps == 2


def test_poly_lr_counts_optimizer_steps_not_micro_steps(tmp_path):
    # 16 images, batch 2 -> 8 micro-steps per epoch; accumulate 2 -> 4 optimizer steps; 2 epochs -> T = 8.
    args = parse("poly", "--batch_size", "2", "--accumulate_steps", "2", "--max_epoch", "2", "--lr", "0.1")
    seen: list[tuple[int, float]] = []

    def step_fn(ctx, batch, step):
        seen.append((step, ctx.lr()))
        return bce_step(ctx, batch, step)

    _, ctx = train(tmp_path, args, ToyImages(16), toy_model(), step_fn)
    assert ctx.total_optimizer_steps == 8 and ctx.members["cg"].optimizer_steps == 8
    for step, lr in seen:
        t = step // 2  # optimizer steps finished before this micro-step
        assert lr == pytest.approx(0.1 * (1 - t / 8) ** 0.9, rel=1e-9)
    assert ctx.lr() == 0.0


def test_bf16_autocast_runs_on_cpu_without_scaler(tmp_path):
    args = parse("amp", "--batch_size", "4", "--max_epoch", "1", "--mixed_precision", "true")
    dtypes = []

    def step_fn(ctx, batch, step):
        with ctx.autocast():
            logits = ctx.models["cg"](ctx.to_device(batch["image"]))
        dtypes.append(logits.dtype)
        return bce_step(ctx, batch, step)

    before = {k: v.clone() for k, v in toy_model().state_dict().items()}
    summary, ctx = train(tmp_path, args, ToyImages(8), toy_model(), step_fn)
    assert ctx.amp_dtype == torch.bfloat16 and ctx.members["cg"].scaler is None
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    after = load_weights(Path(summary["final_path"]))
    assert np.isfinite(summary["train/loss"])
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(after["5.weight"], before["5.weight"])


def test_accumulating_two_halves_equals_one_full_batch(tmp_path):
    # 4 images, 1 epoch: one optimizer step either way; the sampler gives both runs the same order.
    full, _ = train(tmp_path / "a", parse("full", "--batch_size", "4", "--max_epoch", "1"), ToyImages(4), toy_model())
    mean, _ = train(
        tmp_path / "b",
        parse("mean", "--batch_size", "2", "--max_epoch", "1", "--accumulate_steps", "2", "--accumulate_mean", "true"),
        ToyImages(4),
        toy_model(),
    )
    summed, _ = train(
        tmp_path / "c",
        parse("sum", "--batch_size", "2", "--max_epoch", "1", "--accumulate_steps", "2"),
        ToyImages(4),
        toy_model(),
    )
    w0 = toy_model().state_dict()
    w_full, w_mean, w_sum = (load_weights(Path(s["final_path"])) for s in (full, mean, summed))
    for key in w0:
        torch.testing.assert_close(w_mean[key], w_full[key], rtol=0, atol=1e-6)
        # Reference behaviour (--accumulate_mean false): gradients are summed, so the step is twice as long.
        torch.testing.assert_close(w_sum[key] - w0[key], 2 * (w_full[key] - w0[key]), rtol=1e-4, atol=1e-6)


def test_resume_after_interrupt_gives_identical_weights(tmp_path):
    # Random "augmentation", dropout, EMA and an epoch (5 steps) that ends in the middle of a 2-step accumulation.
    flags = (
        "--batch_size",
        "2",
        "--max_epoch",
        "2",
        "--accumulate_steps",
        "2",
        "--ema_warmup",
        "0",
        "--ema_steps",
        "1",
    )
    straight, _ = train(tmp_path / "a", parse("run", *flags), ToyImages(10, noise=True), toy_model(0.3), ema=True)

    def interrupted(ctx, batch, step):
        if step == ctx.steps_per_epoch:  # first step of epoch 2: the job is killed
            raise KeyboardInterrupt
        return bce_step(ctx, batch, step)

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", parse("run", *flags), ToyImages(10, noise=True), toy_model(0.3), interrupted, ema=True)
    saved = checkpoint.load(tmp_path / "b" / "run" / "last.pth")
    assert saved["epoch"] == 1 and saved["step"] == 5 and saved["pending_grads"]["cg"]  # 5th step still pending
    assert not (tmp_path / "b" / "run.pth").exists()
    with pytest.raises(WSSSError, match="--resume true"):
        runtime.setup(parse("run", *flags), "test", models_dir=tmp_path / "b")
    resumed, ctx = train(
        tmp_path / "b", parse("run", *flags, "--resume", "true"), ToyImages(10, noise=True), toy_model(0.3), ema=True
    )
    assert ctx.epoch == 2 and ctx.step == 10
    w_straight, w_resumed = load_weights(Path(straight["final_path"])), load_weights(Path(resumed["final_path"]))
    for key in w_straight:
        assert torch.equal(w_straight[key], w_resumed[key]), key
    assert resumed["train/loss"] == straight["train/loss"]


def test_cpu_loader_workers_come_from_a_forkserver_and_draw_what_forked_workers_draw(tmp_path, monkeypatch):
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no forkserver start method on this platform")
    run = runtime.setup(parse("fs", "--num_workers", "2", "--batch_size", "4"), "test", models_dir=tmp_path)
    try:
        dataset = ToyImages(16, noise=True)  # per-item draws from torch's and numpy's streams in the workers
        served = engine.build_loader(dataset, run, train=True)
        assert served.multiprocessing_context.get_start_method() == "forkserver"
        monkeypatch.setattr(engine_context, "training_workers_context", lambda device_type, workers: None)
        forked = engine.build_loader(dataset, run, train=True)
        assert forked.multiprocessing_context is None  # the platform default: fork on Linux
        ctx = engine.TrainContext(run, len(served))
        epochs = []
        for epoch in (0, 1):
            from_server = list(engine_loop._epoch_batches(ctx, served, epoch))
            from_fork = list(engine_loop._epoch_batches(ctx, forked, epoch))
            assert len(from_server) == len(from_fork) == 4
            for a, b in zip(from_server, from_fork, strict=True):
                assert a["id"] == b["id"]
                assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
            epochs.append(torch.cat([batch["image"] for batch in from_server]))
        assert not torch.equal(epochs[0], epochs[1])  # the draws change with the epoch, so the match means something
    finally:
        run.close()
    assert parallel.training_workers_context("cpu", 0) is None  # in-process loading
    assert parallel.training_workers_context("cuda", 2) is None  # weights on the device: fork stays
    assert parallel.training_workers_context("cpu", 2).get_start_method() == "forkserver"


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    args = parse("nan", "--batch_size", "4", "--max_epoch", "3")

    def explodes_in_epoch_two(ctx, batch, step):
        if ctx.epoch == 1:
            with ctx.autocast():
                loss = ctx.models["cg"](ctx.to_device(batch["image"])).sum() * float("nan")
            ctx.update("cg", loss)
        return bce_step(ctx, batch, step)

    last = tmp_path / "nan" / "last.pth"
    with pytest.raises(engine.NonFiniteLossError, match=r"not finite at epoch 2, step 3.*last\.pth"):
        train(tmp_path, args, ToyImages(8), toy_model(), explodes_in_epoch_two)
    state = checkpoint.load(last)
    assert state["epoch"] == 1 and state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["models"]["cg"].values())
    assert not (tmp_path / "nan.pth").exists()


def test_refuses_to_overwrite_final_weights(tmp_path):
    final = tmp_path / "exp" / "done.pth"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"earlier result")
    with pytest.raises(WSSSError, match=r"done\.pth already exists.*--overwrite true"):
        runtime.setup(parse("exp/done", "--batch_size", "4"), "test", models_dir=tmp_path)
    with pytest.raises(WSSSError, match="already exists"):
        runtime.setup(parse("exp/done", "--batch_size", "4", "--resume", "true"), "test", models_dir=tmp_path)
    assert final.read_bytes() == b"earlier result"
    summary, _ = train(
        tmp_path,
        parse("exp/done", "--batch_size", "4", "--max_epoch", "1", "--overwrite", "true"),
        ToyImages(4),
        toy_model(),
    )
    assert Path(summary["final_path"]) == final and set(load_weights(final)) == set(toy_model().state_dict())


def test_ema_is_the_hand_computed_average_after_two_steps(tmp_path):
    args = parse(
        "ema", "--batch_size", "4", "--max_epoch", "1", "--ema_decay", "0.75", "--ema_steps", "1", "--ema_warmup", "0"
    )
    snapshots = [{k: v.clone() for k, v in toy_model().state_dict().items()}]

    def step_fn(ctx, batch, step):
        out = bce_step(ctx, batch, step)
        snapshots.append({k: v.clone() for k, v in ctx.module("cg").state_dict().items()})
        return out

    summary, ctx = train(tmp_path, args, ToyImages(8), toy_model(), step_fn, ema=True)
    theta0, theta1, theta2 = snapshots
    final = load_weights(Path(summary["final_path"]))
    for key in theta0:
        expected = 0.75 * (0.75 * theta0[key] + 0.25 * theta1[key]) + 0.25 * theta2[key]
        torch.testing.assert_close(final[key], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(final[key], theta2[key])  # a real average, not the live weights


def test_ema_copies_buffers_and_follows_during_warmup():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.5, every_steps=2, warmup_steps=1)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model, optimizer_step=1)  # warm-up: plain copy
    assert torch.equal(ema.module[0].weight, model[0].weight)
    old = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model, optimizer_step=2)  # 1 step after warm-up, every 2: buffers only
    assert torch.equal(ema.module[0].weight, old) and torch.equal(ema.module[1].running_mean, model[1].running_mean)
    ema.update(model, optimizer_step=3)
    torch.testing.assert_close(ema.module[0].weight, 0.5 * old + 0.5 * model[0].weight)
    assert ema.num_updates == 1 and not ema.module[0].weight.requires_grad


def test_checkpoint_rng_round_trip(tmp_path):
    state = checkpoint.capture_rng_state()
    expected = (np.random.rand(), torch.rand(1).item())
    path = checkpoint.save(tmp_path / "s.pth", {"rng": state})
    checkpoint.restore_rng_state(checkpoint.load(path)["rng"])
    assert (np.random.rand(), torch.rand(1).item()) == expected
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WSSSError, match=r"bad\.pth cannot be read"):
        checkpoint.load(tmp_path / "bad.pth")


def test_wandb_is_optional_and_a_failing_init_only_warns(monkeypatch, caplog):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert runlog.wandb_requested(None) is False and runlog.wandb_requested(True) is True
    monkeypatch.setenv("WANDB_PROJECT", "wsss")
    assert runlog.wandb_requested(None) is True and runlog.wandb_requested(False) is False
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert runlog.wandb_requested(True) is False

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=broken_init))
    logger = runlog.WandbLogger(True, name="t", job_type="cam", config={"lr": 0.1})
    assert logger.run is None and "wandb.init failed" in caplog.text
    logger.log({"train/loss": 1.0}, step=1)  # no-ops, no exception
    logger.finish()


def test_metrics_lines_are_json_even_for_nan(tmp_path):
    writer = runlog.MetricsWriter(tmp_path / "m" / "metrics.jsonl")
    writer.write({"kind": "epoch", "loss": float("nan"), "t": torch.tensor(0.5)})
    writer.write({"kind": "epoch", "loss": 1.0})
    runlog.MetricsWriter(tmp_path / "other.jsonl", enabled=False).write({"x": 1})
    assert runlog.read_metrics(tmp_path / "m" / "metrics.jsonl") == [
        {"kind": "epoch", "loss": "nan", "t": 0.5},
        {"kind": "epoch", "loss": 1.0},
    ]
    assert not (tmp_path / "other.jsonl").exists()


def test_fp16_scaler_skips_overflowing_steps_without_advancing_the_schedule(tmp_path, monkeypatch):
    # Exercise the GPU fp16 path on CPU: a GradScaler, clipping of unscaled gradients, and one overflowing step.
    fp16 = ComputeFormat("cpu", torch.float16, True, False, "test: the fp16 path of older GPUs")
    monkeypatch.setattr(engine.context, "compute_format", lambda enabled, device, channels_last=None: fp16)
    args = parse(
        "fp16", "--batch_size", "2", "--max_epoch", "1", "--mixed_precision", "true", "--max_grad_norm", "1e-3"
    )
    model = toy_model()
    overflow_at = {"step": 1}
    model[5].weight.register_hook(lambda g: g * float("inf") if overflow_at["step"] == 1 else g)
    lrs = []

    def step_fn(ctx, batch, step):
        overflow_at["step"] = step
        lrs.append(ctx.lr())
        before = ctx.module("cg")[5].weight.detach().clone()
        out = bce_step(ctx, batch, step)
        moved = (ctx.module("cg")[5].weight.detach() - before).norm().item()
        assert (moved == 0.0) if step == 1 else (0.0 < moved <= 0.1 * 1e-3 + 1e-7)  # lr 0.1 x clipped norm
        return out

    _, ctx = train(tmp_path, args, ToyImages(8), model, step_fn)
    member = ctx.members["cg"]
    assert member.scaler is not None and member.scaler.get_scale() == 2.0**15  # halved once
    assert (member.optimizer_steps, member.skipped_steps) == (3, 1)
    t = [0, 1, 1, 2]  # the skipped step 1 does not advance the poly schedule
    assert lrs == pytest.approx([0.1 * (1 - k / 4) ** 0.9 for k in t])


@pytest.mark.torch_threads(3)
def test_torch_threads_marker_overrides_the_module_count():
    # conftest's _torch_threads fixture: the test's own marker wins over the module's torch_threads(1).
    assert torch.get_num_threads() == 3


def test_compute_format_rules(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    fast = precision.compute_format(True, "cpu")
    assert fast.amp_dtype == torch.bfloat16 and fast.channels_last and not fast.needs_scaler
    assert "bfloat16" in fast.describe() and "channels_last" in fast.describe()
    plain = precision.compute_format(False, "cpu")
    assert plain.amp_dtype is None and not plain.channels_last  # fp32 on CPU stays contiguous (reference CAMs)
    assert precision.compute_format(True, "cpu", channels_last=False).channels_last is False
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    fallback = precision.compute_format(True, "cpu")
    assert fallback.amp_dtype is None and not fallback.channels_last and "ignored" in fallback.reason
    assert fallback.needs_scaler is False


def _classifier_update(fmt: ComputeFormat) -> torch.Tensor:
    """Flattened parameter change of one SGD step of a resnet18 classifier on a fixed tiny batch under ``fmt``."""
    from core.models import Classifier

    torch.manual_seed(0)
    model = Classifier("resnet18", 4, backbone_weights="none").train()
    if fmt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    if fmt.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with fmt.autocast():
        logits = model(images)
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


@pytest.mark.skipif(not precision.cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_cpu_step_moves_the_weights_like_fp32():
    fp32 = _classifier_update(precision.compute_format(False, "cpu"))
    bf16_format = precision.compute_format(True, "cpu")
    assert bf16_format.amp_dtype == torch.bfloat16 and bf16_format.channels_last
    bf16 = _classifier_update(bf16_format)
    assert torch.isfinite(bf16).all() and bf16.norm() > 0
    # bf16 rounds activations and gradients (8-bit mantissa): the same direction, not the same numbers (0.94 here).
    assert nn.functional.cosine_similarity(bf16, fp32, dim=0) > 0.9
