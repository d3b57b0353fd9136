"""Emitting the structured events of :mod:`kubetune.api.events` (the operator's and local mode's contract).

Events go to stdout, one per line, flushed at once; human log lines go to stderr. Only rank 0 emits.
The emitter also keeps the events of the run's final summary (artifact, ``after`` evaluation, finished or
failed) and writes them to the container's termination message when the trainer exits, so the operator has
the result even when the pod's log is lost.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from typing import Any, TextIO

from kubetune.api.events import MARKER, Event, EventType, format_event, termination_message

# the event types termination_message picks from; evaluations only of this stage
_SUMMARY_TYPES = frozenset({"artifact", "evaluation", "finished", "failed"})
_SUMMARY_STAGE = "after"


class Emitter:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.summary: list[Event] = []  # the emitted events a termination message is made of, in order
        self._lock = threading.Lock()

    def emit(self, event_type: EventType, **fields: Any) -> None:
        if not self.enabled:
            return
        line = format_event(event_type, **fields)
        stream = self.stream or sys.stdout
        with self._lock:
            stream.write(line + "\n")
            stream.flush()
            if event_type in _SUMMARY_TYPES and (event_type != "evaluation" or fields.get("stage") == _SUMMARY_STAGE):
                # the line as a reader gets it (NaN already null), but all metrics kept: parse_line would cut a
                # long metrics dict before termination_message picks the key ones from it
                with contextlib.suppress(ValueError):  # a null metric: log readers drop the line, and so do we
                    self.summary.append(Event.model_validate(json.loads(line[len(MARKER):])))

    def termination_message(self) -> str:
        with self._lock:
            return termination_message(self.summary)

    def write_termination_message(self, path: str | None) -> bool:
        """Write the summary to ``path`` (the container's termination log); False when there is nothing to write
        (not rank 0, no summary event yet, no path) or the file cannot be written (local mode, tests)."""
        if not self.enabled or path is None:
            return False
        text = self.termination_message()
        if not text:  # an empty message would also hide the log tail FallbackToLogsOnError puts there
            return False
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            return False
        return True
