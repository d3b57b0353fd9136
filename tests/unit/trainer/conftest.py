"""Fixtures of the trainer tests (helpers live in kt_trainer_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_trainer.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), n=256, eval_n=96, size=32, seed=0)


@pytest.fixture(autouse=True)
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's trainer writes its termination message here, never to the /dev/termination-log of a CI pod
    the tests may run in."""
    path = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(path))
    return path
