"""Distributed helpers, and DDP on CPU (gloo): 2 processes x 2 images must update like 1 process x 4 images.

Run as a script (``torchrun --standalone --nproc_per_node=2 tests/test_distributed.py --tag ...``) this file is the
worker of the two-process tests; pytest collects only the ``test_*`` functions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import commands
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from core import cli, distributed, engine, runtime
from core.errors import WSSSError
from core.optim import PolyLR

REPO = Path(__file__).resolve().parents[1]


class FrozenBNNet(nn.Module):
    """Conv -> frozen BatchNorm (as ``--mode fix``) -> pooled linear head; 2 outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4).requires_grad_(False)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)
        self.head = nn.Linear(4, 2)

    def train(self, mode: bool = True) -> FrozenBNNet:
        super().train(mode)
        self.bn.eval()  # statistics never depend on the per-process batch
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class FixedImages(Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(11)
        self.images = torch.randn(n, 3, 6, 6, generator=g)
        self.labels = (torch.rand(n, 2, generator=g) > 0.5).float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ddp toy worker")
    engine.add_training_args(parser)
    parser.add_argument("--models_dir", type=str, required=True)
    return parser


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    # the engine's own run context: it also makes every rank leave the process group together
    with runtime.training_run(args, "test", __file__, models_dir=args.models_dir) as run:
        loader = engine.build_loader(FixedImages(), run, train=True)
        ctx = engine.TrainContext(run, len(loader))
        model = FrozenBNNet()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        ctx.add("cg", model, optimizer, PolyLR(optimizer, ctx.total_optimizer_steps))

        def step_fn(ctx, batch, step):
            with ctx.autocast():
                logits = ctx.models["cg"](ctx.to_device(batch["image"]))
                loss = nn.functional.binary_cross_entropy_with_logits(logits, ctx.to_device(batch["label"]))
            ctx.update("cg", loss)
            return {"loss": loss.item()}

        return engine.fit(ctx, loader, step_fn)


def _toy_flags(models_dir: Path, tag: str, batch_size: int) -> list[str]:
    return [
        "--tag",
        tag,
        "--models_dir",
        str(models_dir),
        "--batch_size",
        str(batch_size),
        "--max_epoch",
        "2",
        "--accumulate_steps",
        "2",
        "--lr",
        "0.5",
        "--num_workers",
        "0",
        "--device",
        "cpu",
    ]


def _torchrun(flags: list[str]) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *flags]
    return commands.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_two_processes_update_like_one_process_with_the_same_global_batch(tmp_path):
    done = _torchrun(_toy_flags(tmp_path, "ddp", 4))
    assert done.returncode == 0, done.stderr[-3000:]
    main(get_args_parser().parse_args(_toy_flags(tmp_path, "single", 4)))
    ddp = torch.load(tmp_path / "ddp.pth", weights_only=True)
    single = torch.load(tmp_path / "single.pth", weights_only=True)
    initial = FrozenBNNet().state_dict()
    assert set(ddp) == set(single)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5)
    assert (single["head.weight"] - initial["head.weight"]).abs().max() > 1e-3  # training really moved the weights
    assert (tmp_path / "ddp" / "log.txt.rank1").is_file()  # every rank keeps its own log


def test_global_batch_not_divisible_by_processes_is_an_error(tmp_path, monkeypatch, capsys):
    # Pretend to be rank 0 of 2 (a real 2-process launch is covered above); the check runs before any collective.
    monkeypatch.setattr(distributed, "init_distributed", lambda device="auto": distributed.DistInfo(0, 2))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, get_args_parser(), _toy_flags(tmp_path, "odd", 3))
    assert exit_info.value.code == 2
    assert (
        "error: --batch_size 3 is the global batch and must be divisible by the 2 processes" in capsys.readouterr().err
    )
    assert not (tmp_path / "odd").exists()
    with pytest.raises(WSSSError, match="divisible by the 4 processes"):
        distributed.per_rank_batch(6, 4)
    assert distributed.per_rank_batch(32, 4) == 8


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed("cpu")
    assert (info.rank, info.world_size, info.device, info.distributed, info.is_main) == (
        0,
        1,
        torch.device("cpu"),
        False,
        True,
    )
    assert distributed.all_reduce_mean({"b": 2, "a": torch.tensor(1.5)}) == {"a": 1.5, "b": 2.0}
    assert distributed.all_ranks_agree(False) is False and distributed.all_ranks_agree(True) is True
    model = nn.Linear(2, 2)
    assert distributed.wrap_model(model, info) is model and distributed.unwrap(model) is model
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(WSSSError, match="WORLD_SIZE"):
        distributed.init_distributed("cpu")


def test_shard_is_round_robin_disjoint_and_complete():
    ids = [f"id{i}" for i in range(7)]
    shards = [distributed.shard(ids, rank, 3) for rank in range(3)]
    assert shards == [["id0", "id3", "id6"], ["id1", "id4"], ["id2", "id5"]]
    assert sorted(sum(shards, [])) == sorted(ids)
    with pytest.raises(ValueError):
        distributed.shard(ids, 3, 3)


def test_training_sampler_order_depends_only_on_seed_and_epoch():
    info = distributed.DistInfo()
    dataset = FixedImages(10)
    first, again = (distributed.build_sampler(dataset, info, shuffle=True, seed=5) for _ in range(2))
    first.set_epoch(1)
    again.set_epoch(1)
    assert list(first) == list(again)
    again.set_epoch(2)
    assert list(first) != list(again) and sorted(again) == list(range(10))
    halves = [distributed.build_sampler(dataset, distributed.DistInfo(r, 2), shuffle=True, seed=5) for r in range(2)]
    for half in halves:
        half.set_epoch(1)
    assert sorted(list(halves[0]) + list(halves[1])) == list(range(10))


if __name__ == "__main__":
    cli.run(main, get_args_parser())
