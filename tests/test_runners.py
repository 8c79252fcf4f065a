"""The shell runners end to end on a tiny synthetic tree: the demo chain and the methods comparison (CPU, 1 epoch).

Outputs go to a temporary WORK_DIR, so the repository's own experiments/ is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import commands
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "SYN_TRAIN": "12", "SYN_VAL": "4", "SYN_AUG": "12", "SYN_SIZE": "64", "SYN_CLASSES": "3",
    "IMAGE_SIZE": "64", "MIN_IMAGE_SIZE": "64", "MAX_IMAGE_SIZE": "64", "EPOCHS": "1", "EPOCHS_PNOC": "1",
    "BATCH_OC": "4", "BATCH_PNOC": "2", "ACCUMULATE_PNOC": "2", "SCALES": "1.0",
    "IMAGE_SIZE_SAL": "64", "EPOCHS_SAL": "1", "BATCH_SAL": "4", "EPOCHS_PN": "1", "BATCH_PN": "4",
    "IMAGE_SIZE_AFF": "80", "MIN_SIZE_AFF": "64", "MAX_SIZE_AFF": "64", "EPOCHS_AFF": "1", "BATCH_AFF": "4",
    "AFF_CRF_T": "0", "PSEUDO_CRF_T": "0", "PSEUDO_MIN_FG": "0",
    "IMAGE_SIZE_SEG": "64", "MIN_SIZE_SEG": "64", "MAX_SIZE_SEG": "64", "EPOCHS_SEG": "1", "BATCH_SEG": "4",
    "WORKERS_TRAIN": "0", "WORKERS_INFER": "1", "OMP_NUM_THREADS": "1",
}  # fmt: skip


def run_runner(name: str, work_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = os.environ | TINY | env
    environment |= {"WORK_DIR": str(work_dir), "PY": sys.executable, "LAUNCH": sys.executable}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    return commands.run(
        ["bash", str(REPO / "runners" / name), *args], env=environment, capture_output=True, text=True, timeout=600
    )


def make_tiny_data(data_dir: Path) -> None:
    commands.run(
        [sys.executable, str(REPO / "tools" / "make_synthetic_voc.py"), "--out", str(data_dir), "--train", "12",
         "--val", "4", "--aug", "12", "--size", "64", "--classes", "3"],
        check=True, capture_output=True,
    )  # fmt: skip


def results(work_dir: Path) -> dict[str, dict]:
    folder = work_dir / "experiments" / "results" / "synthetic"
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_scores_every_stage_and_resumes(tmp_path):
    first = run_runner("demo.sh", tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    scores = results(tmp_path)
    stages = {name.split("_")[0] for name in scores}
    assert stages == {"vanilla", "pnoc", "saliency", "afflabels", "rw", "pseudo", "seg"}, sorted(scores)
    cams = {name for name in scores if name.split("_")[0] in ("vanilla", "pnoc")}
    assert len(cams) == 2 and all(scores[name]["protocol"]["mode"] == "npy" for name in cams)
    affinity = next(summary for name, summary in scores.items() if name.startswith("afflabels_"))
    assert 0 < affinity["labelled"] <= 100 and 0 <= affinity["labelled_accuracy"] <= 100
    rw = next(summary for name, summary in scores.items() if name.startswith("rw_"))
    assert rw["protocol"]["mode"] == "npy" and len(rw["sweep"]) > 1  # thresholds swept on the RW maps
    segmentation = [name for name in scores if name.startswith("seg_")]
    assert len(segmentation) == 1 and segmentation[0].endswith("@val.json")  # DeepLabV3+ scored on val
    for stage in ("vanilla_synthetic", "saliency_", "rw_", "pseudo_", "seg_synthetic"):
        assert stage in first.stdout  # the pipeline's table
    assert (tmp_path / "experiments" / "images" / "pipeline-demo.png").is_file()
    saliency = {name: scores[name] for name in scores if name.startswith("saliency_")}
    evaluated = [name for name, summary in saliency.items() if summary["protocol"]["mode"] == "saliency"]
    as_background = [name for name, summary in saliency.items() if summary["protocol"].get("sal_dir")]
    assert len(evaluated) == 3 and len(as_background) == 2  # P-NOC CAMs, C²AM-H masks, PoolNet; 2 x CAMs + saliency
    assert any("ccamh" in name for name in evaluated) and any("poolnet" in name for name in evaluated)
    for summary in scores.values():
        assert 0 < summary["miou"] <= 100
    for name in evaluated:
        assert 0 <= saliency[name]["mae"] <= 1 and 0 <= saliency[name]["max_fbeta"] <= 1
    assert "mIoU" in first.stdout and "vanilla_synthetic" in first.stdout and "saliency_" in first.stdout  # the table

    models = sorted((tmp_path / "experiments" / "models").rglob("*.pth"))
    stamps = {path: path.stat().st_mtime_ns for path in models}
    second = run_runner("demo.sh", tmp_path)  # resumes: nothing retrained
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("[skip]") == 6  # vanilla, P-NOC, C²AM-H, PoolNet, AffinityNet, DeepLabV3+
    assert {path: path.stat().st_mtime_ns for path in models} == stamps


@pytest.mark.slow
def test_compare_runner_scores_the_requested_methods(tmp_path):
    data_dir = tmp_path / "VOC2012"
    make_tiny_data(data_dir)
    done = run_runner("compare-cams.sh", tmp_path, DATASET="synthetic", METHODS="vanilla occse", DATA_DIR=str(data_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(name.split("_")[0] for name in results(tmp_path)) == ["occse", "vanilla"]
    assert "occse_synthetic-resnet18-e1-cmp@train" in done.stdout


@pytest.mark.slow
def test_compare_runner_over_seeds_reports_mean_and_sd(tmp_path):
    data_dir = tmp_path / "VOC2012"
    make_tiny_data(data_dir)
    done = run_runner("compare-cams.sh", tmp_path, "--seeds", "2", DATASET="synthetic", METHODS="vanilla",
                      DATA_DIR=str(data_dir))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(results(tmp_path)) == ["vanilla_synthetic-resnet18-e1-cmp-s1@train.json",
                                         "vanilla_synthetic-resnet18-e1-cmp@train.json"]  # fmt: skip
    seeds = [json.loads(path.read_text())["seed"] for path in (tmp_path / "experiments" / "models").rglob("args.json")]
    assert sorted(seeds) == [0, 1]
    row = next(line for line in done.stdout.splitlines() if line.startswith("vanilla_synthetic-resnet18-e1-cmp@train"))
    assert " 2 " in row and "±" in row  # n = 2, mean ± sd


def test_compare_runner_rejects_a_bad_seed_count(tmp_path):
    failed = run_runner("compare-cams.sh", tmp_path, "--seeds", "0", DATASET="synthetic")
    assert failed.returncode == 2
    assert failed.stderr.strip() == "error: SEEDS=0 must be a positive integer"


@pytest.mark.parametrize(("methods", "message"), [
    ("vanilla bogus", "error: unknown method bogus"),
    ("vanilla eps-ppc", "error: METHODS=eps needs SAL_DIR"),
])  # fmt: skip
def test_compare_runner_checks_every_method_before_training(tmp_path, methods, message):
    failed = run_runner("compare-cams.sh", tmp_path, DATASET="synthetic", METHODS=methods, SAL_DIR="")
    assert failed.returncode == 2 and failed.stderr.startswith(message), failed.stderr
    assert not (tmp_path / "experiments" / "models").exists()  # vanilla, named first, did not train


def voc_tree_as_coco(voc: Path, coco: Path) -> dict[str, str]:
    """The synthetic VOC tree in COCO 2014's layout: train -> train2014, val -> val2014, masks (class indices, which
    the synthetic classes share with COCO's first ones) -> coco_seg_anno/; returns VOC id -> COCO id."""
    ids = {}
    for voc_domain, split in (("train", "train2014"), ("val", "val2014")):
        (coco / split).mkdir(parents=True, exist_ok=True)
        (coco / "coco_seg_anno").mkdir(exist_ok=True)
        for image_id in (voc / "ImageSets" / "Segmentation" / f"{voc_domain}.txt").read_text().split():
            coco_id = f"{len(ids) + 1:012d}"
            shutil.copy(voc / "JPEGImages" / f"{image_id}.jpg", coco / split / f"COCO_{split}_{coco_id}.jpg")
            mask = np.asarray(Image.open(voc / "SegmentationClass" / f"{image_id}.png"))  # palette indices
            Image.fromarray(mask.astype(np.uint8)).save(coco / "coco_seg_anno" / f"{coco_id}.png")
            ids[image_id] = coco_id
    return ids


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_on_a_coco_layout_tree(tmp_path):
    """DATASET=coco14 through every stage (the COCO reader, lists from tools/prepare_coco14.py, the coco14 recipes
    with every network shrunk to resnet18 at 64 px): each stage scores on train2014/val2014 like on VOC."""
    voc, coco = tmp_path / "voc", tmp_path / "coco14"
    make_tiny_data(voc)
    voc_tree_as_coco(voc, coco)
    commands.run([sys.executable, str(REPO / "tools" / "prepare_coco14.py"), "--data_dir", str(coco),
                  "--num_workers", "1"], check=True, capture_output=True, timeout=120)  # fmt: skip
    small = {f"ARCH{part}": "resnet18" for part in ("", "_SAL", "_PN", "_AFF", "_SEG")}
    small |= {f"{part}WEIGHTS": "none" for part in ("BACKBONE_", "SAL_", "PN_", "AFF_", "SEG_")}
    small |= {"STAGE4_SAL": "0", "HEAD_SCALE_PN": "0.25", "SMALL_SIDE_PN": "0", "USE_GN": "false", "RW_EXP": "1",
              "SEG_SCALES": "1.0", "SEG_CRF_T": "0", "MIXED_PRECISION": "false", "OPTIMIZER": "adamw", "LR": "0.001",
              "PUZZLE_ALPHA": "1.0", "AUGMENT_OC": "none", "BATCH_SAL": "4", "ACCUMULATE_SAL": "1", "BATCH_PN": "4",
              "ACCUMULATE_PN": "1"}  # fmt: skip
    work = tmp_path / "work"
    done = run_runner("pipeline.sh", work, DATASET="coco14", DATA_DIR=str(coco), **small)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = work / "experiments" / "results" / "coco14"
    scores = {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
    stages = {name.split("_")[0] for name in scores}
    assert stages == {"vanilla", "pnoc", "saliency", "afflabels", "rw", "pseudo", "seg"}, sorted(scores)
    assert all("@train2014" in name or "@val2014" in name for name in scores)  # COCO's domains
    assert any(name.startswith("seg_") and name.endswith("@val2014.json") for name in scores)
    for summary in scores.values():
        assert 0 < summary["miou"] <= 100 and summary["protocol"]["dataset"] == "coco14"
    assert "seg_coco14" in done.stdout  # the pipeline's table


def test_unknown_dataset_is_one_clear_line(tmp_path):
    failed = run_runner("1-priors.sh", tmp_path, DATASET="voc13")
    assert failed.returncode == 2
    assert failed.stderr.strip() == "error: unknown DATASET=voc13 (choose voc12, coco14 or synthetic)"


def _launch_command(tmp_path: Path, **slurm: str) -> str:
    """The LAUNCH that runners/config/env.sh builds in a faked SLURM job (scontrol lists two nodes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        '#!/usr/bin/env bash\n[[ "$*" == "show hostnames gpu-[07-08]" ]] && printf "gpu-07\\ngpu-08\\n"\n'
    )
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("LAUNCH", "NGPU")}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "WORK_DIR": str(tmp_path), "NGPU": "4", **slurm}
    script = f'REPO={REPO}; source "$REPO/runners/config/env.sh"; echo "$LAUNCH"'
    done = commands.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_slurm_launch_command_spans_the_allocated_nodes(tmp_path):
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[07-08]", "MASTER_PORT": "24242"}
    assert _launch_command(tmp_path, SLURM_NNODES="2", **job) == (
        "srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=4 "
        "--rdzv_id=4242 --rdzv_backend=c10d --rdzv_endpoint=gpu-07:24242"
    )
    assert _launch_command(tmp_path, SLURM_NNODES="1", **job) == "torchrun --standalone --nproc_per_node=4"
    assert _launch_command(tmp_path) == "torchrun --standalone --nproc_per_node=4"  # no SLURM job at all


def test_sbatch_file_runs_the_pipeline_with_a_port_of_its_job(tmp_path):
    sbatch = (REPO / "runners" / "slurm" / "pipeline.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in sbatch and 'exec bash "$REPO/runners/pipeline.sh"' in sbatch
    env = os.environ | {"SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "7"}
    done = commands.run(["bash", str(REPO / "runners" / "slurm" / "pipeline.sbatch")], env=env, capture_output=True,
                        text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2 and "submit from the repository root" in done.stderr
