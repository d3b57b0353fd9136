"""Kubernetes resource quantities (``20Gi``, ``500M``, ``1.5e9``) as numbers."""

from __future__ import annotations

import re

_SUFFIXES = {"": 1.0, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
             "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_QUANTITY = re.compile(r"^\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:([eE][-+]?[0-9]+)|([numkMGTPE]i?|Ki)?)$")


def parse_quantity(value: str) -> float:
    """The number a quantity stands for; ValueError names a malformed one."""
    match = _QUANTITY.match(value.strip())
    suffix = match and (match.group(3) or "")
    if not match or suffix not in _SUFFIXES:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 20Gi, 500M)")
    number = float(match.group(1) + (match.group(2) or ""))
    return number * _SUFFIXES[suffix]


__all__ = ["parse_quantity"]
