"""Print one table of mIoU per stage from the JSON files written by ``scripts/evaluate.py --json``.

Reads:  the given JSON files (any order; each names its predictions folder in its protocol)
Writes: nothing, unless --markdown OUT (the same table as Markdown, atomically)
Example:
    python tools/summarize_results.py experiments/results/synthetic/*.json
    python tools/summarize_results.py --over_seeds experiments/results/synthetic/*.json   # mean ± sd per run

With ``--over_seeds``, results whose names differ only by a seed suffix ``-s<k>`` just before ``@<domain>`` (the
runners' naming; seed 0 has no suffix) form one row: mean ± sample standard deviation over the seeds, and ``n``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
from pathlib import Path

from core import cli
from core.artifacts import atomic_write
from core.errors import WSSSError

logger = logging.getLogger(__name__)

COLUMNS = (
    "result",
    "domain",
    "mode",
    "saliency",
    "threshold",
    "mIoU",
    "mIoU fg",
    "FP",
    "FN",
    "MAE",
    "max F",
    "labelled (acc)",
)
SEED_COLUMNS = ("result", "domain", "mode", "saliency", "n", "mIoU", "mIoU fg", "FP", "FN")
SEED_SUFFIX = re.compile(r"-s\d+(?=@|$)")
SCORES = {"mIoU": "miou", "mIoU fg": "miou_fg", "FP": "fp", "FN": "fn"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("summarize_results", description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("files", nargs="+", type=Path, help="JSON files written by scripts/evaluate.py --json")
    cli.add_arg(parser, "--markdown", type=Path, default=None, help="also write the table as Markdown to this file")
    cli.add_bool_arg(parser, "--over_seeds", False, "one row per run over its seeds (-s<k> suffixes): mean ± sd, n")
    return parser


def read_json(path: Path) -> dict:
    """An evaluation JSON file, or a one-line error naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise WSSSError(f"result file {path} does not exist; run scripts/evaluate.py with --json {path}") from e
    except json.JSONDecodeError as e:
        raise WSSSError(f"result file {path} is not valid JSON ({e}); rerun scripts/evaluate.py --json {path}") from e
    return data


def read_result(path: Path) -> dict:
    """One row of the table from an evaluation JSON file."""
    data = read_json(path)
    protocol = data.get("protocol", {})
    threshold = data.get("threshold")
    return {
        "result": path.stem,
        "domain": str(protocol.get("domain", "?")),
        "mode": str(protocol.get("mode", "?")) + (" oracle" if "oracle" in str(protocol.get("eval_mode")) else ""),
        "saliency": saliency_column(data),
        "threshold": "-" if threshold is None else f"{threshold:.2f}",
        "mIoU": f"{data['miou']:.2f}",
        "mIoU fg": f"{data.get('miou_fg', float('nan')):.2f}",
        "FP": f"{data.get('fp', float('nan')):.2f}",
        "FN": f"{data.get('fn', float('nan')):.2f}",
        "MAE": "-" if data.get("mae") is None else f"{data['mae']:.4f}",
        "max F": "-" if data.get("max_fbeta") is None else f"{data['max_fbeta']:.4f}",
        "labelled (acc)": labelled_column(data),
    }


def labelled_column(data: dict) -> str:
    """``<% labelled> (<% right of those>)`` for label maps that leave pixels out (255), ``-`` otherwise."""
    if data.get("labelled") is None:
        return "-"
    return f"{data['labelled']:.1f} ({data['labelled_accuracy']:.1f})"


def saliency_column(data: dict) -> str:
    """Whether a result used saliency: ``-``, ``evaluated`` (the predictions are saliency maps) or ``bg`` (saliency
    as the CAMs' background; which folder is in the JSON's protocol); results written before saliency was recorded
    read ``?``."""
    protocol = data.get("protocol", {})
    if "saliency" not in protocol:
        return "?"
    if str(protocol.get("mode")) == "saliency":
        return "evaluated"
    return "bg" if protocol.get("sal_dir") else "-"


def run_name(path: Path) -> str:
    """The result's name without its seed suffix: ``vanilla_x-cmp-s2@train`` -> ``vanilla_x-cmp@train``."""
    return SEED_SUFFIX.sub("", path.stem)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def seed_rows(paths: list[Path]) -> list[dict]:
    """One row per run (first-seen order): each score's mean ± sample sd over the run's seeds."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        runs.setdefault(run_name(path), []).append(read_json(path))
    rows = []
    for name, results in runs.items():
        protocol = results[0].get("protocol", {})
        row = {"result": name, "domain": str(protocol.get("domain", "?")), "mode": str(protocol.get("mode", "?"))}
        row |= {"saliency": saliency_column(results[0]), "n": str(len(results))}
        for column, key in SCORES.items():
            row[column] = _mean_sd([float(result.get(key, float("nan"))) for result in results])
        rows.append(row)
    return rows


def format_table(rows: list[dict], markdown: bool = False, columns: tuple[str, ...] = COLUMNS) -> str:
    """Aligned plain-text table, or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
        return "\n".join(lines)
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    header = "  ".join(f"{c:<{widths[c]}}" for c in columns)
    body = ["  ".join(f"{row[c]:<{widths[c]}}" for c in columns) for row in rows]
    return "\n".join([header, "-" * len(header), *body])


def main(args: argparse.Namespace) -> list[dict]:
    if args.over_seeds:
        rows, columns = seed_rows(args.files), SEED_COLUMNS
    else:
        rows, columns = [read_result(path) for path in args.files], COLUMNS
    print(format_table(rows, columns=columns))
    if args.markdown is not None:
        with atomic_write(args.markdown) as tmp:
            tmp.write_text(format_table(rows, markdown=True, columns=columns) + "\n")
    return rows


if __name__ == "__main__":
    cli.run(main, get_args_parser())
