"""Affinity labels (core.rw.labels, scripts/rw/make_affinity_labels.py) and RW pseudo labels
(core.pseudo_masks, scripts/rw/make_pseudo_labels.py and its scripts/segmentation twin)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import core.labels
from core import cli, manifest, paths
from core.artifacts import cam_path, load_label_map, save_cam, save_saliency, write_json
from core.crf import crf_inference_labels
from core.datasets import VOC_CLASSES, build_source
from core.labels import labels_after_crf
from core.rw.labels import affinity_labels, combine_confident
from scripts.rw import make_affinity_labels, make_pseudo_labels
from scripts.segmentation import make_pseudo_labels as seg_make_pseudo_labels

FEW_IDS = 4

# Two planes (keys 3 and 7) over a 2x4 image, and a saliency map.
HAND_CAMS = np.array(
    [
        [[0.9, 0.5, 0.2, 0.02], [0.35, 0.0, 0.04, 0.6]],  # key 3
        [[0.1, 0.6, 0.1, 0.01], [0.3, 0.2, 0.03, 0.1]],  # key 7
    ],
    dtype=np.float32,
)
HAND_SALIENCY = np.array([[0.9, 0.9, 0.05, 0.5], [0.8, 0.02, 0.5, 0.02]], dtype=np.float32)


def test_affinity_label_rules_by_hand_without_saliency():
    # fg 0.4: 3, 7, -, - / -, -, -, 3; bg 0.05: max <= 0.05 at (0, 3), (1, 2) -> 0; the rest is uncertain.
    labels = affinity_labels(HAND_CAMS, [3, 7], 0.4, 0.05)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[3, 7, 255, 0], [255, 255, 0, 3]]
    # A class wins over the background map (the reference's order): fg 0.4 == bg 0.4 gives no 255 at all.
    assert 255 not in affinity_labels(HAND_CAMS, [3, 7], 0.4, 0.4)


def test_affinity_label_rules_by_hand_with_saliency():
    # salient = s > 0.1; fg = salient * argmax([0.4; cams]); class where fg, 0 where not salient, else 255.
    labels = affinity_labels(HAND_CAMS, [3, 7], 0.4, 0.1, saliency=HAND_SALIENCY)
    assert labels.tolist() == [[3, 7, 0, 255], [255, 0, 255, 0]]
    # (1, 3): CAM 0.6 for key 3 but not salient -> background, not the class.
    assert affinity_labels(HAND_CAMS, [3, 7], 0.4, 0.1)[1, 3] == 3


def two_region_image() -> np.ndarray:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, :8] = (200, 30, 30)
    image[:, 8:] = (30, 30, 200)
    return image


def test_affinity_labels_with_the_crf_follow_the_refined_maps():
    rng = np.random.default_rng(0)
    image = two_region_image()
    cams = np.zeros((1, 16, 16), np.float32)
    cams[0, :, :8] = 0.8
    cams = np.clip(cams + 0.3 * rng.random(cams.shape, dtype=np.float32) - 0.15, 0, 1)
    saliency = (cams[0] > 0.5).astype(np.float32)
    keys = np.array([4])
    # No saliency: both maps are CRF'd with the given t and gt_prob.
    got = affinity_labels(cams, keys, 0.5, 0.1, image=image, crf_t=3, crf_gt_prob=0.8)
    fg = np.array([0, 4])[crf_inference_labels(image, (cams[0] > 0.5).astype(np.int64), 2, t=3, gt_prob=0.8)]
    bg = np.array([0, 4])[crf_inference_labels(image, (cams[0] > 0.1).astype(np.int64), 2, t=3, gt_prob=0.8)]
    shared = labels_after_crf(cams, keys, [0.5, 0.1], image, 3, 0.8)  # one CRF for both maps: same results
    assert np.array_equal(shared[0], fg) and np.array_equal(shared[1], bg)
    assert np.array_equal(got, combine_confident(fg, bg == 0))
    # Saliency: CRF(1[s > bg]) over 2 labels, then CRF(salient * argmax) over n + 1 labels.
    got = affinity_labels(cams, keys, 0.5, 0.1, saliency=saliency, image=image, crf_t=3, crf_gt_prob=0.8)
    salient = crf_inference_labels(image, (saliency > 0.1).astype(np.int64), 2, t=3, gt_prob=0.8)
    compact = np.where(cams[0] > 0.5, 1, 0) * salient
    fg = np.array([0, 4])[crf_inference_labels(image, compact, 2, t=3, gt_prob=0.8)]
    assert np.array_equal(got, combine_confident(fg, salient == 0))
    assert set(np.unique(got)) <= {0, 4, 255} and (got[:, :8] == 4).mean() > 0.9


# --------------------------------------------------------------------------------------------------------------------
# scripts/rw/make_affinity_labels.py
# --------------------------------------------------------------------------------------------------------------------


def gt_like_cams(gt: np.ndarray, keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """0.7 on the class, noise up to 0.35 elsewhere: float32 [n, H, W] in [0, 1]."""
    planes = [0.7 * (gt == key) + 0.35 * rng.random(gt.shape) for key in keys]
    return np.clip(np.stack(planes), 0, 1).astype(np.float32) if planes else np.zeros((0, *gt.shape), np.float32)


@pytest.fixture()
def few(tmp_path, monkeypatch, synthetic_voc):
    """cwd = tmp_path; few.txt (4 train ids), their GT-like CAMs in experiments/predictions/cams@few and saliency
    maps (GT foreground, blurred by noise) in sal/."""
    monkeypatch.chdir(tmp_path)
    source = build_source("voc12", synthetic_voc, "train")
    ids = source.ids[:FEW_IDS]
    (tmp_path / "few.txt").write_text("\n".join(ids) + "\n")
    rng = np.random.default_rng(0)
    for image_id in ids:
        gt = source.read_mask(image_id)
        keys = np.flatnonzero(source.label(image_id)) + 1
        hr_cam = gt_like_cams(gt, keys, rng)
        save_cam(cam_path(tmp_path / "experiments/predictions/cams@few", image_id), keys, hr_cam[:, ::4, ::4], hr_cam)
        saliency = np.clip(0.8 * ((gt > 0) & (gt < 255)) + 0.3 * rng.random(gt.shape), 0, 1)
        save_saliency(tmp_path / "sal" / f"{image_id}.png", saliency)
    return ids


def aff_flags(data_dir, *extra: str) -> list[str]:
    domain = str(Path("few.txt").resolve())
    common = ["--data_dir", str(data_dir), "--domain", domain, "--experiment_name", "cams@few", "--tag", "aff"]
    return [*common, "--num_workers", "1", *extra]


def make_aff(argv: list[str]) -> dict:
    return make_affinity_labels.main(make_affinity_labels.get_args_parser().parse_args(argv))


def expected_affinity(data_dir, image_id, fg, bg, sal=True, crf_t=0):
    source = build_source("voc12", data_dir, "train")
    cams_file = np.load(f"experiments/predictions/cams@few/{image_id}.npz")
    saliency = np.asarray(Image.open(f"sal/{image_id}.png"), np.float32) / 255 if sal else None
    image = source.read_image(image_id) if crf_t else None
    return affinity_labels(cams_file["hr_cam"], cams_file["keys"], fg, bg, saliency=saliency, image=image, crf_t=crf_t)


def test_affinity_labels_script_with_and_without_saliency(few, synthetic_voc):
    summary = make_aff(aff_flags(synthetic_voc, "--sal_dir", "sal", "--fg_threshold", "0.4", "--bg_threshold", "0.1"))
    out = Path(summary["out_dir"])
    assert out == Path("experiments/predictions/aff@aff_fg=0.40_bg=0.10")
    assert (summary["written"], summary["skipped"], summary["images"]) == (FEW_IDS, 0, FEW_IDS)
    assert 0 < summary["foreground_fraction"] < summary["labelled_fraction"] < 1
    for image_id in few:
        with Image.open(out / f"{image_id}.png") as png:
            assert png.mode == "P"
        got = load_label_map(out / f"{image_id}.png")
        assert np.array_equal(got, expected_affinity(synthetic_voc, image_id, 0.4, 0.1))
    record = manifest.read_manifest(out)
    assert record["complete"] and set(record["inputs"]) == {"cams", "saliency"}
    assert record["context"]["threshold_rule"] == "given"
    again = make_aff(aff_flags(synthetic_voc, "--sal_dir", "sal", "--fg_threshold", "0.4", "--bg_threshold", "0.1"))
    assert (again["written"], again["skipped"]) == (0, FEW_IDS)

    plain = make_aff(aff_flags(synthetic_voc))  # IRN branch, reference defaults 0.30 / 0.05
    out = Path(plain["out_dir"])
    assert out.name == "aff@aff_fg=0.30_bg=0.05"
    for image_id in few:
        got = load_label_map(out / f"{image_id}.png")
        assert np.array_equal(got, expected_affinity(synthetic_voc, image_id, 0.3, 0.05, sal=False))
        assert 255 in got and 0 in got


def test_crf_flags_reach_the_crf_in_the_branch_without_saliency(few, synthetic_voc, monkeypatch):
    calls = []

    def recording_crf(image, label_maps, n_labels, t=10, gt_prob=0.7):
        calls.append((len(label_maps), t, gt_prob))
        return label_maps

    monkeypatch.setattr(core.labels, "crf_inference_label_maps", recording_crf)
    make_aff(aff_flags(synthetic_voc, "--crf_t", "3", "--crf_gt_prob", "0.85", "--output", "crf"))
    assert calls == [(2, 3, 0.85)] * FEW_IDS  # the fg and the bg map of every image, in one CRF


def test_auto_thresholds_come_from_the_cam_sweep(few, synthetic_voc, caplog):
    sweep = paths.evaluation_dir(Path("experiments/predictions/cams@few")) / "results.json"
    result = {"miou": 61.0, "threshold": 0.25, "sweep": [{"threshold": 0.2}, {"threshold": 0.25}]}
    write_json(sweep, {**result, "uses_saliency": False, "protocol": {"mode": "npy", "domain": "train"}})
    caplog.set_level("INFO")
    summary = make_aff(aff_flags(synthetic_voc, "--fg_threshold", "auto", "--bg_threshold", "auto"))
    assert Path(summary["out_dir"]).name == "aff@aff_fg=0.35_bg=0.15"
    assert "fg = best + 0.1, bg = best - 0.1" in caplog.text and str(sweep) in caplog.text
    assert set(manifest.read_manifest(summary["out_dir"])["inputs"]) == {"cams", "sweep"}
    only_fg = make_aff(aff_flags(synthetic_voc, "--fg_threshold", "auto", "--sal_dir", "sal", "--bg_threshold", "0.1"))
    assert Path(only_fg["out_dir"]).name == "aff@aff_fg=0.35_bg=0.10"


def cli_error(main, parser, argv: list[str], capsys) -> str:
    """Run a script through cli.run; assert exit status 2 and return stderr's last line (the error)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, parser, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") or "error:" in err.splitlines()[-1]
    return err.splitlines()[-1]


def test_affinity_labels_bad_input_is_one_line(few, synthetic_voc, capsys):
    def error(*extra: str) -> str:
        parser = make_affinity_labels.get_args_parser()
        return cli_error(make_affinity_labels.main, parser, aff_flags(synthetic_voc, *extra), capsys)

    (Path("sal") / f"{few[2]}.png").unlink()
    assert f"1 of {FEW_IDS} saliency maps missing in sal (first: {few[2]})" in error("--sal_dir", "sal")
    assert "thresholds the saliency map" in error("--sal_dir", "sal", "--bg_threshold", "auto")
    assert "evaluate the CAM folder first" in error("--fg_threshold", "auto")  # no sweep yet
    assert "--fg_threshold" in error("--fg_threshold", "1.5") and "[0, 1]" in error("--fg_threshold", "1.5")
    assert "must not exceed --fg_threshold" in error("--bg_threshold", "0.5")

    cams = Path("experiments/predictions/cams@few")
    write_json(cams / "manifest.json", {"id": "x", "context": {"domain": "val"}, "complete": True})
    (cams / f"{few[1]}.npz").unlink()
    err = error()
    assert f"1 of {FEW_IDS} CAM files missing in {cams} (first: {few[1]})" in err
    assert "made for --domain val" in err and "scripts/cam/inference.py" in err
    assert not list(Path("experiments/predictions").glob("aff@*"))  # nothing written


# --------------------------------------------------------------------------------------------------------------------
# scripts/rw/make_pseudo_labels.py (and scripts/segmentation/make_pseudo_labels.py)
# --------------------------------------------------------------------------------------------------------------------

RW_KEYS = {"a": [12, 8], "c": [15], "d": [8]}  # b: background only (labels.csv), no RW file


@pytest.fixture()
def rw_root(tmp_path, monkeypatch, synthetic_voc):
    """cwd = tmp_path; a custom dataset (images a..d) whose ``train`` list (a, b) has image labels (b: background
    only) and whose ``test`` list (c, d) has none; RW folders experiments/predictions/rw@<domain>@rw with random
    scores for a, c, d; saliency maps for every id in sal/."""
    monkeypatch.chdir(tmp_path)
    voc = build_source("voc12", synthetic_voc, "train")
    root = tmp_path / "custom"
    (root / "images").mkdir(parents=True)
    (root / "lists").mkdir()
    for name, image_id in zip("abcd", voc.ids, strict=False):
        Image.fromarray(voc.read_image(image_id)).save(root / "images" / f"{name}.png")
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    (root / "lists" / "train.txt").write_text("a\nb\n")
    (root / "lists" / "test.txt").write_text("c\nd\n")
    (root / "labels.csv").write_text("a,dog|cat\nb,\n")
    rng = np.random.default_rng(3)
    for name, keys in RW_KEYS.items():
        domain = "train" if name == "a" else "test"
        rw = rng.random((len(keys), 64, 64)).astype(np.float32)
        save_cam(cam_path(f"experiments/predictions/rw@{domain}@rw", name), keys, rw[:, ::4, ::4], rw)
    for name in "abcd":
        save_saliency(tmp_path / "sal" / f"{name}.png", rng.random((64, 64)).astype(np.float32))
    return root


def rw_flags(root: Path, *extra: str) -> list[str]:
    return ["--dataset", "custom", "--data_dir", str(root), "--num_workers", "1", "--crf_t", "0", *extra]


def make_labels(argv: list[str], script=make_pseudo_labels) -> dict:
    return script.main(script.get_args_parser().parse_args(argv))


def rw_scores(name: str) -> tuple[np.ndarray, np.ndarray]:
    domain = "train" if name == "a" else "test"
    with np.load(f"experiments/predictions/rw@{domain}@rw/{name}.npz") as data:
        return data["hr_cam"], data["keys"]


def test_pseudo_labels_of_one_domain_are_the_thresholded_argmax(rw_root):
    summary = make_labels(
        rw_flags(rw_root, "--domain", "test", "--experiment_name", "rw@test@rw", "--threshold", "0.6")
    )
    out = Path(summary["out_dir"])
    assert out == Path("experiments/predictions/rw@test@rw@crf=0")  # the reference's name
    assert (summary["written"], summary["images"]) == (2, 2)
    for name in "cd":
        rw, keys = rw_scores(name)
        with Image.open(out / f"{name}.png") as png:
            assert png.mode == "P"
        expected = np.where(rw.max(axis=0) > 0.6, np.asarray(keys)[rw.argmax(axis=0)], 0)
        assert np.array_equal(load_label_map(out / f"{name}.png"), expected)
        assert set(np.unique(expected)) == {0, *keys}


def test_saliency_background_plane_is_one_minus_saliency(rw_root):
    summary = make_labels(rw_flags(rw_root, "--domain", "test", "--experiment_name", "rw@test@rw", "--sal_dir", "sal"))
    rw, keys = rw_scores("c")
    saliency = np.asarray(Image.open("sal/c.png"), np.float32) / np.float32(255)
    expected = np.where(rw.max(axis=0) > 1 - saliency, np.asarray(keys)[rw.argmax(axis=0)], 0)
    got = load_label_map(Path(summary["out_dir"]) / "c.png")
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, np.where(rw.max(axis=0) > saliency, keys[0], 0))  # not the reference's plane


def test_several_domains_share_one_folder_and_both_entry_points(rw_root):
    argv = rw_flags(rw_root, "--domains", "train", "--domains", "test", "--experiment_name", "rw@{domain}@rw")
    summary = make_labels(argv)
    out = Path(summary["out_dir"])
    assert out == Path("experiments/predictions/rw@rw@crf=0")
    assert summary["domains"] == ["train", "test"]
    assert (summary["written"], summary["background_only"]) == (4, 1)
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png", "d.png"]
    assert not load_label_map(out / "b.png").any()  # background-only image: zeros, no RW file needed
    assert set(manifest.read_manifest(out)["inputs"]) == {"rw@train", "rw@test"}
    # The segmentation path runs the same code: it resumes the folder instead of refusing it.
    again = make_labels(argv, script=seg_make_pseudo_labels)
    assert (again["written"], again["skipped"]) == (0, 4)
    listed = make_labels(
        rw_flags(rw_root, "--domains", "train,test", "--rw_dirs", "experiments/predictions/rw@train@rw,"
                 "experiments/predictions/rw@test@rw")
    )  # fmt: skip
    assert listed["out_dir"] == summary["out_dir"] and listed["skipped"] == 4


def test_an_almost_all_background_folder_stops_the_run(rw_root, capsys):
    argv = rw_flags(rw_root, "--domain", "test", "--experiment_name", "rw@test@rw", "--threshold", "1.0")
    err = cli_error(make_pseudo_labels.main, make_pseudo_labels.get_args_parser(), argv, capsys)
    assert "is almost all background" in err and "0.0% class pixels" in err and "--min_foreground 0" in err
    out = Path("experiments/predictions/rw@test@rw@crf=0")
    assert not manifest.read_manifest(out)["complete"]
    summary = make_labels([*argv, "--min_foreground", "0"])  # accepted on request, the written masks are kept
    assert (summary["written"], summary["skipped"], summary["foreground_fraction"]) == (0, 2, 0.0)


def test_pseudo_labels_bad_input_is_one_line(rw_root, capsys):
    def error(*extra: str) -> str:
        return cli_error(
            make_pseudo_labels.main, make_pseudo_labels.get_args_parser(), rw_flags(rw_root, *extra), capsys
        )

    Path("experiments/predictions/rw@test@rw/d.npz").unlink()
    err = error("--domains", "train,test", "--experiment_name", "rw@{domain}@rw")
    assert "1 of 2 CAM files missing in experiments/predictions/rw@test@rw (first: d)" in err
    assert "scripts/rw/inference.py for --domain test" in err
    assert "put {domain} where the domain goes" in error("--domains", "train,test", "--experiment_name", "rw@test@rw")
    assert "2 folders for 1 domains" in error("--rw_dirs", "x,y")
    assert "does not exist" in error("--domain", "test", "--experiment_name", "rw@nowhere")
    (Path("sal") / "a.png").unlink()
    err = error("--domain", "train", "--experiment_name", "rw@train@rw", "--sal_dir", "sal")
    assert "1 of 1 saliency maps missing in sal (first: a)" in err  # b is background-only: no map needed
    assert not Path("experiments/predictions/rw@train@rw@crf=0").exists()  # nothing written
