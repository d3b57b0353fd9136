"""Fixtures of the trainer tests (helpers live in kt_trainer_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_trainer.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), n=256, eval_n=96, size=32, seed=0)
