"""tools/summarize_results.py: one row per result, or one row per run over its seeds (mean ± sample sd)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import summarize_results  # noqa: E402

from core.errors import WSSSError  # noqa: E402


def write_result(folder: Path, name: str, miou: float) -> Path:
    path = folder / f"{name}.json"
    protocol = {"domain": "train", "mode": "npy"}
    path.write_text(json.dumps({"protocol": protocol, "miou": miou, "miou_fg": miou - 5, "fp": 0.1, "fn": 0.2}))
    return path


def test_seed_suffixes_group_into_one_row_with_mean_and_sample_sd(tmp_path):
    paths = [
        write_result(tmp_path, "vanilla_syn-cmp@train", 50.0),
        write_result(tmp_path, "vanilla_syn-cmp-s1@train", 54.0),
        write_result(tmp_path, "vanilla_syn-cmp-s2@train", 58.0),
        write_result(tmp_path, "pnoc_syn-cmp@train", 60.0),
    ]
    rows = summarize_results.seed_rows(paths)
    assert [row["result"] for row in rows] == ["vanilla_syn-cmp@train", "pnoc_syn-cmp@train"]
    assert rows[0]["n"] == "3" and rows[0]["mIoU"] == "54.00 ± 4.00" and rows[0]["mIoU fg"] == "49.00 ± 4.00"
    assert rows[1]["n"] == "1" and rows[1]["mIoU"] == "60.00"


def test_a_suffix_inside_the_name_is_not_a_seed(tmp_path):
    assert summarize_results.run_name(Path("pnoc_syn-s1x-cmp@train.json")) == "pnoc_syn-s1x-cmp@train"
    assert summarize_results.run_name(Path("pnoc_syn-cmp-s12@train.json")) == "pnoc_syn-cmp@train"


def test_markdown_table_over_seeds(tmp_path):
    paths = [write_result(tmp_path, "a-x@train", 40.0), write_result(tmp_path, "a-x-s1@train", 42.0)]
    out = tmp_path / "table.md"
    args = summarize_results.get_args_parser().parse_args([*map(str, paths), "--over_seeds", "--markdown", str(out)])
    summarize_results.main(args)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| result | domain | mode | saliency | n | mIoU")
    assert "| a-x@train | train | npy | ? | 2 | 41.00 ± 1.41 |" in lines[2]


def test_a_missing_result_file_is_one_line(tmp_path):
    with pytest.raises(WSSSError, match="does not exist; run scripts/evaluate.py"):
        summarize_results.seed_rows([tmp_path / "nope@train.json"])


def test_labelled_column_only_for_label_maps_that_leave_pixels_out(tmp_path):
    plain = summarize_results.read_result(write_result(tmp_path, "pnoc_syn@train", 60.0))
    path = tmp_path / "aff@train.json"
    path.write_text(
        json.dumps({"protocol": {"mode": "png"}, "miou": 40.0, "labelled": 62.345, "labelled_accuracy": 97.0})
    )
    assert plain["labelled (acc)"] == "-"
    assert summarize_results.read_result(path)["labelled (acc)"] == "62.3 (97.0)"
