"""Stand-in trainer: emits the kubetune event contract without training anything (stdlib only).

It reads the run config the operator mounts (``$KUBETUNE_CONFIG``, JSON-compatible YAML) and takes its
behaviour from ``spec.model.config.standin`` (all optional):

    steps: 10            optimizer steps in total (default: spec.training.maxSteps or epochs * 5)
    pace: 0.2            seconds between steps
    exit_code: 0         exit code at the end ...
    fail_attempts: 0     ... used only while $KUBETUNE_ATTEMPT <= fail_attempts (later attempts succeed);
                         with fail_attempts 0 the exit code applies to every attempt
    fail_at_step: null   fail at this step instead of at the end
    noise_lines: 1       human log lines per step
    garbage_lines: 0     malformed lines per step (partial events, bad JSON, 100 kB lines, binary, a flood)
    alloc_mb: 0          allocate (and touch) this many MiB at the first step (an OOM kill under a small limit)
    quiet_end: false     the final events (after-evaluation, artifact, finished) go to the termination message
                         only, not to stdout: a log the operator never read (a cut stream, a pod removed first)
    term_delay: 0        on SIGTERM, go on this many seconds (printing) before exiting: a trainer writing its
                         checkpoint in the grace period

It reads the same ``KUBETUNE_*`` variables as the real trainer (a subset of ``kubetune.api.trainer_env``, which it
cannot import; a unit test compares the names) and does what the trainer does with them:

- ``$KUBETUNE_CONFIG``: the run config.
- ``$KUBETUNE_RUN_UID``: a config whose ``metadata.uid`` differs is refused (exit 78, ``InvalidConfig``).
- ``$KUBETUNE_ATTEMPT``: reported in ``started``; drives ``fail_attempts``.
- ``$KUBETUNE_RESUME_FROM``: the stand-in has no store, so the checkpoint URI stands for it: ending in
  ``step-N`` the attempt continues from step N; naming anything else it fails (exit 78, ``CheckpointMissing``),
  as the trainer does when its store has no checkpoint.
- ``$KUBETUNE_TERMINATION_LOG``: the final events (``kubetune.api.events.termination_message``'s format, copied
  below) are written there on every exit; unset, to ``/dev/termination-log`` when that file exists.

SIGTERM ends the run with exit 143 after a retryable ``failed`` event, as the real trainer does.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable

MARKER = "KUBETUNE_EVENT "
EXIT_BAD_CONFIG = 78
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# kubetune.api.events.termination_message, in small: the same picks, order, trimming and bound
TERMINATION_MESSAGE_MAX_BYTES = 4096
TERMINATION_METRICS = ("R@1", "R@5", "R@10", "reciprocal_rank", "ndcg_at_k", "image_to_text_R@1")

summary: list[dict] = []  # the emitted events a termination message is made of
term_delay = 0.0  # seconds a SIGTERM'd stand-in goes on (spec.model.config.standin.term_delay)


def render(payload: dict) -> str:
    return MARKER + json.dumps({k: v for k, v in payload.items() if v is not None}, separators=(",", ":"),
                               sort_keys=True)


def emit(kind: str, *, quiet: bool = False, **fields: object) -> None:
    payload = {"v": 1, "type": kind, "time": time.time(), **fields}
    if not quiet:
        sys.stdout.write(render(payload) + "\n")
        sys.stdout.flush()
    if kind in ("artifact", "finished", "failed") or (kind == "evaluation" and fields.get("stage") == "after"):
        summary.append(payload)


def termination_message(events: list[dict], limit: int = TERMINATION_MESSAGE_MAX_BYTES) -> str:
    def last(match: Callable[[dict], bool]) -> int | None:
        return next((i for i in range(len(events) - 1, -1, -1) if match(events[i])), None)

    slots = {"artifact": last(lambda e: e["type"] == "artifact"),
             "evaluation": last(lambda e: e["type"] == "evaluation" and e.get("stage") == "after"),
             "end": last(lambda e: e["type"] in ("finished", "failed"))}
    chosen = {slot: dict(events[i]) for slot, i in slots.items() if i is not None}
    order = sorted(chosen, key=lambda slot: slots[slot] or 0)
    metrics = (chosen.get("evaluation") or {}).get("metrics") or {}
    keys = [k for k in TERMINATION_METRICS if k in metrics]
    keys += sorted(k for k in metrics if "loss" in k and k not in keys)

    def text() -> str:
        lines = []
        for slot in order:
            event = chosen[slot]
            if slot == "evaluation":
                if not keys:
                    continue
                event = {k: event.get(k) for k in ("v", "type", "time", "stage", "epoch")}
                event["metrics"] = {k: metrics[k] for k in keys}
            lines.append(render(event))
        return "\n".join(lines)

    def fits() -> bool:
        return len(text().encode()) <= limit

    while keys and not fits():
        keys.pop()
    end = chosen.get("end")
    if not fits() and end is not None and end["type"] == "failed" and end.get("message"):
        message = str(end["message"])
        lo, hi = 0, len(message)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            end["message"] = message[:mid] + "..."
            lo, hi = (mid, hi) if fits() else (lo, mid - 1)
        end["message"] = message[:lo] + "..."
    while order and not fits():
        order.pop(0)
    return text()


def write_termination_message() -> None:
    path = os.environ.get("KUBETUNE_TERMINATION_LOG") or (
        DEFAULT_TERMINATION_LOG if os.path.exists(DEFAULT_TERMINATION_LOG) else None)
    text = termination_message(summary)
    if path is None or not text:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        pass


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def garbage(step: int, n: int) -> None:
    """Malformed output the operator must survive: none of it may reach the status unbounded."""
    samples = [
        MARKER + '{"type": "progress", "step": ',  # a partial event
        MARKER + "not json at all",
        MARKER + '{"type": "progress", "step": "many", "loss": "NaN"}',
        MARKER + json.dumps({"type": "evaluation", "stage": "after", "metrics": {f"m{i}": i for i in range(500)}}),
        "x" * 100_000,  # a very long human line
        MARKER + "{" * 5000,
        b"\x00\x01\xff\xfe binary, not UTF-8",
    ]
    for i in range(n):
        sample = samples[(step + i) % len(samples)]
        if isinstance(sample, bytes):
            sys.stdout.flush()
            sys.stdout.buffer.write(sample + b"\n")
            sys.stdout.buffer.flush()
        else:
            say(sample)
    for _ in range(n * 20):  # a flood of valid events for the throttle to coalesce
        emit("progress", step=step, total_steps=None)


def on_term(signum: int, frame: object) -> None:
    until = time.time() + term_delay
    while time.time() < until:
        say("stand-in trainer: SIGTERM received, checkpointing before exit")
        time.sleep(0.5)
    emit("failed", reason="Terminated", message="SIGTERM received", retryable=True, exit_code=143)
    sys.exit(143)


def refuse(reason: str, message: str) -> int:
    say(f"stand-in trainer: {message}")
    emit("failed", reason=reason, message=message, retryable=False, exit_code=EXIT_BAD_CONFIG)
    return EXIT_BAD_CONFIG


def main() -> int:
    signal.signal(signal.SIGTERM, on_term)
    try:
        return run()
    finally:  # also after SIGTERM: on_term's sys.exit unwinds through here
        write_termination_message()


def run() -> int:
    path = os.environ.get("KUBETUNE_CONFIG") or "/etc/kubetune/run.yaml"
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    spec = doc["spec"]
    meta = doc["metadata"]
    uid = os.environ.get("KUBETUNE_RUN_UID")
    if uid and meta.get("uid") != uid:
        return refuse("InvalidConfig", f"{path} is not this run's config: it names run uid {meta.get('uid')}, "
                                       f"but this run is {uid}, so it is stale")
    training = spec.get("training") or {}
    behaviour = ((spec.get("model") or {}).get("config") or {}).get("standin") or {}
    epochs = int(training.get("epochs") or 1)
    steps = int(behaviour.get("steps") or training.get("maxSteps") or epochs * 5)
    pace = float(behaviour.get("pace", 0.2))
    attempt = int(os.environ.get("KUBETUNE_ATTEMPT") or "1")
    fail_attempts = int(behaviour.get("fail_attempts", 0))
    exit_code = int(behaviour.get("exit_code", 0))
    if fail_attempts and attempt > fail_attempts:
        exit_code = 0
    fail_at = behaviour.get("fail_at_step")
    noise = int(behaviour.get("noise_lines", 1))
    garbage_lines = int(behaviour.get("garbage_lines", 0))
    alloc_mb = int(behaviour.get("alloc_mb", 0))
    quiet_end = bool(behaviour.get("quiet_end", False))
    global term_delay
    term_delay = float(behaviour.get("term_delay", 0))
    output = spec.get("output") or {}
    bucket, prefix = output.get("bucket", "kubetune"), output.get("prefix", "kubetune")
    base = f"s3://{bucket}/{prefix}/{meta['namespace']}/{meta['name']}"
    start = 0
    resume = os.environ.get("KUBETUNE_RESUME_FROM")
    if resume:
        match = re.search(r"step-(\d+)", resume)
        if not match:
            return refuse("CheckpointMissing", f"this run resumes from {resume}, which names no checkpoint")
        start = int(match.group(1))
    say(f"stand-in trainer: run {meta['namespace']}/{meta['name']} attempt {attempt}, {steps} steps")
    emit("started", run=meta["name"], model=(spec.get("model") or {}).get("name", "?"), epochs=epochs,
         total_steps=steps, world_size=1, attempt=attempt, resumed_from_step=start)
    emit("evaluation", stage="before", epoch=0, metrics={"recall_at_k": 0.25, "mrr": 0.1})
    steps_per_epoch = max(1, math.ceil(steps / epochs))
    t0 = time.time()
    for step in range(start + 1, steps + 1):
        time.sleep(pace)
        if alloc_mb and step == start + 1:
            hog = bytearray(alloc_mb << 20)
            for offset in range(0, len(hog), 4096):
                hog[offset] = 1
            say(f"stand-in trainer: holding {alloc_mb} MiB")
        if garbage_lines:
            garbage(step, garbage_lines)
        epoch = min(epochs, (step - 1) // steps_per_epoch + 1)
        loss = 2.0 / math.sqrt(step)
        for i in range(noise):
            say(f"step {step}/{steps} epoch {epoch} loss {loss:.4f} ({i})")
        rate = (step - start) / max(1e-6, time.time() - t0)
        emit("progress", epoch=epoch, epochs=epochs, step=step, total_steps=steps, loss=round(loss, 5),
             lr=1e-5, samples_per_second=round(rate * 64, 2), eta_seconds=round((steps - step) / max(rate, 1e-6), 2))
        if fail_at is not None and step == int(fail_at) and exit_code:
            emit("failed", reason="StandInFailure", message=f"configured failure at step {step}",
                 retryable=exit_code in (75, 137, 143), exit_code=exit_code)
            return exit_code
        if step % steps_per_epoch == 0 or step == steps:
            emit("metrics", stage="val", epoch=epoch, step=step, train_loss=round(loss, 5),
                 val_loss=round(loss * 1.1, 5))
            emit("checkpoint", uri=f"{base}/checkpoints/step-{step}", step=step, epoch=epoch)
    if exit_code:
        emit("failed", reason="StandInFailure", message="configured failure at the end",
             retryable=exit_code in (75, 137, 143), exit_code=exit_code)
        return exit_code
    emit("evaluation", stage="after", epoch=epochs, metrics={"recall_at_k": 0.75, "mrr": 0.5, "R@5": 0.75},
         quiet=quiet_end)
    emit("artifact", uri=f"{base}/", size=4096, sha256="0" * 64, files=3, quiet=quiet_end)
    emit("finished", artifact_uri=f"{base}/", duration_seconds=round(time.time() - t0, 3), quiet=quiet_end)
    say("stand-in trainer: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
