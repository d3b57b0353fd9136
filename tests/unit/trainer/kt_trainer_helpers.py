"""Helpers of the trainer tests: the tiny model config, spec/run-file builders, an in-process CLI runner, the
state of the ``http_files`` server fixture."""

from __future__ import annotations

import collections
import copy
import io
import json
import threading
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubetune.api.events import Event, parse_line

# ~0.2M trainable parameters besides the token embedding: trains in seconds on one CPU core.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_spec(train: str, **overrides: Any) -> dict[str, Any]:
    """A spec (camelCase, as a user writes it) for the tiny model; ``overrides`` merge section by section."""
    spec: dict[str, Any] = {
        "model": {"name": "kt-tiny", "config": copy.deepcopy(TINY_CONFIG)},
        "data": {"train": train},
        "training": {"epochs": 2, "batchSize": 32, "learningRate": 1e-3, "numWorkers": 0, "warmupSteps": 2,
                     "weightDecay": 0.1, "seed": 7},
        "callbacks": {"evaluation": {"limit": 10}},
        "runPolicy": {"checkpointEveryEpochs": 0},
        "resources": {"gpus": 0},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(spec.get(section), dict):
            spec[section].update(values)
        else:
            spec[section] = values
    return spec


def write_run(path: Path, spec: dict[str, Any], name: str = "tiny", namespace: str = "team-a",
              uid: str | None = None) -> Path:
    metadata = {"name": name, "namespace": namespace, **({"uid": uid} if uid is not None else {})}
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun", "metadata": metadata, "spec": spec}
    path.write_text(yaml.safe_dump(doc) if path.suffix != ".json" else json.dumps(doc))
    return path


def run_trainer(argv: list[str]) -> tuple[int, list[Event], str]:
    """Run the trainer's CLI in this process; (exit code, parsed events, raw stdout)."""
    from kubetune_trainer.__main__ import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    raw = out.getvalue()
    events = [e for e in (parse_line(line) for line in raw.splitlines()) if e is not None]
    return code, events, raw


def of_type(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.type == kind]


@dataclass
class HttpFiles:
    """What the ``http_files`` server serves and how it answers; the tests change it while the server runs.

    A path's body is ``bodies[path]``, else the file under ``root``, else 404. A path in ``unavailable`` answers
    503 whether or not it exists; the first ``fail_first`` GETs of each existing path answer 503 too. Each GET is
    counted in ``gets``, whatever it answers, then waits ``delay`` seconds."""

    root: Path
    bodies: dict[str, bytes] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)
    fail_first: int = 0
    delay: float = 0.0
    base: str = ""
    gets: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def uri(self, path: str) -> str:
        return self.base + path

    def body(self, path: str) -> bytes | None:
        if path in self.bodies:
            return self.bodies[path]
        file = self.root / path.lstrip("/")
        return file.read_bytes() if file.is_file() else None
