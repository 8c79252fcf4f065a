"""Print one table of mIoU per stage from the JSON files written by ``scripts/evaluate.py --json``.

Reads:  the given JSON files (any order; each names its predictions folder in its protocol)
Writes: nothing, unless --markdown OUT (the same table as Markdown, atomically)
Example:
    python tools/summarize_results.py experiments/results/synthetic/*.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from core import cli
from core.artifacts import atomic_write
from core.errors import WSSSError

logger = logging.getLogger(__name__)

COLUMNS = ("result", "domain", "mode", "saliency", "threshold", "mIoU", "mIoU fg", "FP", "FN", "MAE", "max F")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("summarize_results", description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("files", nargs="+", type=Path, help="JSON files written by scripts/evaluate.py --json")
    cli.add_arg(parser, "--markdown", type=Path, default=None, help="also write the table as Markdown to this file")
    return parser


def read_result(path: Path) -> dict:
    """One row of the table from an evaluation JSON file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise WSSSError(f"result file {path} does not exist; run scripts/evaluate.py with --json {path}") from e
    except json.JSONDecodeError as e:
        raise WSSSError(f"result file {path} is not valid JSON ({e}); rerun scripts/evaluate.py --json {path}") from e
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
    }


def saliency_column(data: dict) -> str:
    """Whether a result used saliency: ``-``, ``evaluated`` (the predictions are saliency maps) or ``bg: <folder>``
    (saliency as the CAMs' background); results written before saliency was recorded read ``?``."""
    protocol = data.get("protocol", {})
    if "saliency" not in protocol:
        return "?"
    if str(protocol.get("mode")) == "saliency":
        return "evaluated"
    sal_dir = protocol.get("sal_dir")
    return f"bg: {Path(sal_dir).name}" if sal_dir else "-"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """Aligned plain-text table, or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
        return "\n".join(lines)
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in COLUMNS}
    header = "  ".join(f"{c:<{widths[c]}}" for c in COLUMNS)
    body = ["  ".join(f"{row[c]:<{widths[c]}}" for c in COLUMNS) for row in rows]
    return "\n".join([header, "-" * len(header), *body])


def main(args: argparse.Namespace) -> list[dict]:
    rows = [read_result(path) for path in args.files]
    print(format_table(rows))
    if args.markdown is not None:
        with atomic_write(args.markdown) as tmp:
            tmp.write_text(format_table(rows, markdown=True) + "\n")
    return rows


if __name__ == "__main__":
    cli.run(main, get_args_parser())
