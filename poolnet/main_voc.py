"""The reference's PoolNet command line, run unchanged from inside ``poolnet/`` (SPEC §8, §12.4).

    cd poolnet
    python main_voc.py --arch resnet --mode train --train_root $DATA_DIR \\
        --pseudo_root ../experiments/predictions/$CCAMH_TAG
    python main_voc.py --arch resnet --mode test --model <ckpt> --sal_folder ../experiments/predictions/$PN_TAG

The flags are translated to ``poolnet/train.py`` / ``poolnet/test.py`` (the clean command lines beside this one):
paths are taken relative to the current folder, then the run works from the repository root, so weights land in
``experiments/models/<tag>.pth`` (``--tag``, default ``poolnet/<name of --pseudo_root>``) instead of
``results/run-<n>/models/``. No list file is needed: ids come from the dataset's domain (default ``train_aug``;
``--train_list`` names another domain or a list file). ``--pretrained_model`` defaults to the reference's
``dataset/pretrained/resnet50_caffe.pth`` when that file exists (Caffe input normalisation), else ImageNet weights
from the torch hub cache. Flags of the reference that change nothing here (``--n_color``, ``--epoch_save``,
``--show_every``, ``--test_fold``, ``--sal_mode``, ``--save_folder``) are accepted and ignored.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file from inside poolnet/: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import cli
from core.errors import WSSSError
from core.models import BACKBONES
from poolnet import test as poolnet_test
from poolnet import train as poolnet_train

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_CAFFE_FILE = Path("dataset/pretrained/resnet50_caffe.pth")  # relative to poolnet/, as the reference
ARCHITECTURES = {"resnet": "resnet50"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("main_voc", description=__doc__.splitlines()[0], add_help=add_help)
    add = parser.add_argument
    add("--mode", type=str, default="train", choices=("train", "test"), help="train or test")
    add(
        "--arch",
        type=str,
        default="resnet",
        help="resnet = ResNet-50; a backbone name (resnet18...) also works; no vgg",
    )
    add("--dataset", type=str, default="voc12", choices=cli.DATASETS, help="dataset layout of --train_root")
    add("--train_root", type=str, default=os.environ.get("WSSS_DATA_DIR"), help="dataset root (VOC2012 folder)")
    add("--pseudo_root", type=str, default=None, help="train: folder of saliency PNGs <id>.png (C²AM-H + CRF)")
    add("--train_list", type=str, default="train_aug", help="domain (id list name) or list file of the images")
    add("--pretrained_model", type=str, default=None, help="backbone .pth (default: the reference's Caffe file)")
    add("--lr", type=float, default=5e-5, help="Adam learning rate")
    add("--wd", type=float, default=5e-4, help="weight decay")
    add("--epoch", type=int, default=9, help="training epochs")
    add("--batch_size", type=int, default=1, help="images per batch (> 1 pads to a common size)")
    add("--iter_size", type=int, default=10, help="batches accumulated per optimizer step")
    add("--num_thread", type=int, default=1, help="data-loading workers")
    add("--no-cuda", dest="cuda", action="store_false", help="run on the CPU")
    add("--load", type=str, default="", help="not supported: resume with poolnet/train.py --resume true")
    add("--head_scale", type=float, default=1.0, help="multiplies the head widths (0.25 for CPU runs)")
    add("--tag", type=str, default=None, help="run name (default poolnet/<name of --pseudo_root>)")
    add("--model", type=str, default=None, help="test: PoolNet weights (.pth)")
    add("--sal_folder", type=str, default=None, help="test: output folder (default experiments/predictions/...)")
    for ignored in ("--n_color", "--epoch_save", "--show_every", "--save_folder", "--test_fold", "--sal_mode"):
        add(ignored, type=str, default=None, help="accepted for the reference's command lines; no effect")
    return parser


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _domain(train_list: str) -> str:
    # A list file is read relative to the current folder; a bare name is a domain of the dataset.
    return _absolute(train_list) if train_list.endswith(".txt") else train_list


def _common(config: argparse.Namespace) -> list[str]:
    architecture = ARCHITECTURES.get(config.arch, config.arch)
    if architecture not in BACKBONES:
        raise WSSSError(f"--arch {config.arch!r} is not provided; use --arch resnet (ResNet-50) or a backbone name")
    if not config.train_root:
        raise WSSSError("no dataset folder given; pass --train_root (the VOC2012 folder) or set WSSS_DATA_DIR")
    argv = ["--architecture", architecture, "--head_scale", str(config.head_scale), "--dataset", config.dataset]
    argv += ["--data_dir", _absolute(config.train_root), "--domain", _domain(config.train_list)]
    return argv + ["--num_workers", str(config.num_thread)] + ([] if config.cuda else ["--device", "cpu"])


def train_argv(config: argparse.Namespace) -> list[str]:
    """The ``poolnet/train.py`` flags of a reference train command line (paths made absolute)."""
    if config.load:
        raise WSSSError("--load is not supported; rerun the same command with poolnet/train.py --resume true")
    if not config.pseudo_root:
        raise WSSSError("no saliency folder given; pass --pseudo_root with the C²AM-H PNGs")
    tag = config.tag or f"poolnet/{Path(config.pseudo_root).resolve().name}"
    weights = config.pretrained_model
    if weights is None:
        weights = str(REFERENCE_CAFFE_FILE) if REFERENCE_CAFFE_FILE.is_file() else "imagenet"
        logger.info("--pretrained_model not given: using %s", weights)
    argv = _common(config) + ["--tag", tag, "--sal_dir", _absolute(config.pseudo_root)]
    argv += ["--backbone_weights", weights if weights in ("imagenet", "none") else _absolute(weights)]
    argv += ["--lr", str(config.lr), "--wd", str(config.wd), "--max_epoch", str(config.epoch)]
    return argv + ["--batch_size", str(config.batch_size), "--accumulate_steps", str(config.iter_size)]


def test_argv(config: argparse.Namespace) -> list[str]:
    """The ``poolnet/test.py`` flags of a reference test command line (paths made absolute)."""
    if not config.model:
        raise WSSSError("--mode test needs --model with the PoolNet weights (.pth) to test")
    argv = _common(config) + ["--weights", _absolute(config.model)]
    if config.tag:
        argv += ["--tag", config.tag]
    if config.sal_folder:
        argv += ["--pred_dir", _absolute(config.sal_folder)]
    elif not config.tag:
        argv += ["--tag", f"poolnet/{Path(config.model).stem}"]
    return argv + ["--batch_size", str(config.batch_size)]


def main(config: argparse.Namespace) -> dict[str, Any]:
    script = poolnet_train if config.mode == "train" else poolnet_test
    argv = train_argv(config) if config.mode == "train" else test_argv(config)
    args = script.get_args_parser().parse_args(argv)
    logger.info("running poolnet/%s.py %s from %s", config.mode, " ".join(argv), ROOT)
    os.chdir(ROOT)  # experiments/ of the repository, where the other stages read and write
    return script.main(args)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
