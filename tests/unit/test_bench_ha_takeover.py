"""The takeover bench's own arithmetic (its figures go into docs/operator.md)."""

from __future__ import annotations

import pytest

from bench.ha_takeover import summarize

pytestmark = pytest.mark.unit


def test_summarize_takeovers() -> None:
    assert summarize([14.94, 14.36, 16.0, 13.2, 15.5]) == {"takeover_p50_s": 14.94, "takeover_max_s": 16.0}
    assert summarize([]) == {"takeover_p50_s": None, "takeover_max_s": None}
