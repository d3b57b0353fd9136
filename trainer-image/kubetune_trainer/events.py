"""Emitting the structured events of :mod:`kubetune.events` (the operator's and local mode's contract).

Events go to stdout, one per line, flushed at once; human log lines go to stderr. Only rank 0 emits.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from kubetune.events import EventType, format_event


class Emitter:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self._lock = threading.Lock()

    def emit(self, event_type: EventType, **fields: Any) -> None:
        if not self.enabled:
            return
        line = format_event(event_type, **fields)
        stream = self.stream or sys.stdout
        with self._lock:
            stream.write(line + "\n")
            stream.flush()
