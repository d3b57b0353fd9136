"""Exponential backoff for every remote read and write: the store's S3 calls and the trainer's data fetches.

One policy sizes the window (``spec.output.retrySeconds``) and one runner applies it, so an outage is ridden out
for the same time, and logged in the same shape, whichever path meets it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

DEFAULT_RETRY_SECONDS = 120


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_delay * 2**i`` capped at ``max_delay``, ``attempts`` tries in all.

    The default sleeps ≈ 120 s in all between 13 tries (0.5, 1, 2, 4, 8, then 15 s apart), so a trainer rides
    out an S3 outage of a minute or more in-process; :meth:`for_window` sizes a policy for another window
    (``spec.output.retrySeconds``). Each try is bounded by the client's connect/read timeouts
    (:func:`kubetune.storage.minio_client`), so a blackholed endpoint adds at most ``attempts`` × those timeouts.
    """

    attempts: int = 13  # = for_window(DEFAULT_RETRY_SECONDS)
    base_delay: float = 0.5
    max_delay: float = 15.0
    sleep: Callable[[float], None] = time.sleep

    def delays(self) -> list[float]:
        return [min(self.max_delay, self.base_delay * 2**i) for i in range(self.attempts - 1)]

    @property
    def window(self) -> float:
        """Seconds slept between the first and the last try."""
        return sum(self.delays())

    @classmethod
    def for_window(cls, seconds: float, base_delay: float = 0.5, max_delay: float = 15.0,
                   sleep: Callable[[float], None] = time.sleep) -> RetryPolicy:
        """The fewest tries whose backoff sleeps add up to at least ``seconds`` (0: one try, no retry)."""
        attempts, total = 1, 0.0
        while total < seconds:
            total += min(max_delay, base_delay * 2 ** (attempts - 1))
            attempts += 1
        return cls(attempts=attempts, base_delay=base_delay, max_delay=max_delay, sleep=sleep)

    def run(self, fn: Callable[[], T], *, what: str,
            transient: type[Exception] | tuple[type[Exception], ...],
            give_up: Callable[[Exception, int], Exception], log: logging.Logger, label: str,
            describe: Callable[[Exception], str] | None = None) -> T:
        """``fn()``, tried again after each ``transient`` exception until the policy's tries are spent.

        Any other exception propagates at once. Each retry logs ``"<label>: <describe(exc)>, retry i/n in Ds"``
        (by default ``describe`` gives ``"<what> failed (<exception type>)"``) and a success after a retry
        ``"<label>: <what> succeeded on try k after Ds"``, both on ``log`` (the caller's logger, so the line
        names the component that met the outage). When the last try fails, ``give_up(last exception, tries)`` is
        raised.
        """
        delays = self.delays()
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                result = fn()
            except transient as exc:
                if attempt >= len(delays):
                    raise give_up(exc, attempt + 1) from None
                reason = describe(exc) if describe else f"{what} failed ({type(exc).__name__})"
                log.warning("%s: %s, retry %d/%d in %.1fs", label, reason, attempt + 1, len(delays), delays[attempt])
                self.sleep(delays[attempt])
                attempt += 1
                continue
            if attempt:
                log.warning("%s: %s succeeded on try %d after %.1fs", label, what, attempt + 1,
                            time.monotonic() - started)
            return result
