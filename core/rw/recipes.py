"""The two AffinityNet methods of the random-walk stage and their recipes (``--method irn|psa``).

* ``irn`` (the default, IRN / P-NOC, SPEC §9): a boundary map at stride 4 on a frozen backbone; affinity ``1 -
  max(boundary on the path)``; pairs closer than 10 cells in training, 5 in the walk; beta 10, 2^8 steps.
* ``psa`` (PSA / SEAM / PPC, METHODS §2): stride-8 features on a trained backbone; affinity ``exp(-mean |f_i -
  f_j|)``; pairs closer than 5 cells; beta 8, 2^6 steps (SEAM/PPC; PSA 2^8).

Flags whose reference default depends on the method are declared with ``default=None``;
:class:`MethodDefaultsParser` fills them from the chosen method's column after parsing, so a flag given on the
command line always wins (also when it equals the other method's default) and ``args.json`` records the value used.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

METHODS = ("irn", "psa")


class MethodDefaultsParser(argparse.ArgumentParser):
    """An ArgumentParser whose flags left at None take the default of the parsed ``--method``.

    Args:
        method_defaults: ``{method: {dest: default}}``.
    """

    def __init__(self, *args: Any, method_defaults: Mapping[str, Mapping[str, Any]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method_defaults = method_defaults

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        for dest, value in self.method_defaults.get(getattr(namespace, "method", None), {}).items():
            if getattr(namespace, dest, None) is None:
                setattr(namespace, dest, value)
        return namespace, extras

    def describe_defaults(self) -> None:
        """Append ``(default: irn X, psa Y)`` to the help of every flag with method-dependent defaults."""
        for action in self._actions:
            values = [f"{m} {d[action.dest]}" for m, d in self.method_defaults.items() if action.dest in d]
            if values and action.help:
                action.help += f" (default: {', '.join(values)})"


def add_method_arg(group: Any, help: str) -> None:
    """``--method irn|psa`` (default irn)."""
    group.add_argument("--method", type=str, default="irn", choices=METHODS, help=help)
