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

A resumed attempt ($KUBETUNE_RESUME_FROM ending in ``step-N``) continues from step N. SIGTERM ends the run
with exit 143 after a retryable ``failed`` event, as the real trainer does.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time

MARKER = "KUBETUNE_EVENT "


def emit(kind: str, **fields: object) -> None:
    payload = {"v": 1, "type": kind, "time": time.time(), **fields}
    sys.stdout.write(MARKER + json.dumps(payload, separators=(",", ":"), sort_keys=True) + "\n")
    sys.stdout.flush()


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
    emit("failed", reason="Terminated", message="SIGTERM received", retryable=True, exit_code=143)
    sys.exit(143)


def main() -> int:
    signal.signal(signal.SIGTERM, on_term)
    path = os.environ.get("KUBETUNE_CONFIG", "/etc/kubetune/run.yaml")
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    spec = doc["spec"]
    meta = doc["metadata"]
    training = spec.get("training") or {}
    behaviour = ((spec.get("model") or {}).get("config") or {}).get("standin") or {}
    epochs = int(training.get("epochs") or 1)
    steps = int(behaviour.get("steps") or training.get("maxSteps") or epochs * 5)
    pace = float(behaviour.get("pace", 0.2))
    attempt = int(os.environ.get("KUBETUNE_ATTEMPT", "1"))
    fail_attempts = int(behaviour.get("fail_attempts", 0))
    exit_code = int(behaviour.get("exit_code", 0))
    if fail_attempts and attempt > fail_attempts:
        exit_code = 0
    fail_at = behaviour.get("fail_at_step")
    noise = int(behaviour.get("noise_lines", 1))
    garbage_lines = int(behaviour.get("garbage_lines", 0))
    alloc_mb = int(behaviour.get("alloc_mb", 0))
    output = spec.get("output") or {}
    bucket, prefix = output.get("bucket", "kubetune"), output.get("prefix", "kubetune")
    base = f"s3://{bucket}/{prefix}/{meta['namespace']}/{meta['name']}"
    start = 0
    resume = os.environ.get("KUBETUNE_RESUME_FROM", "")
    match = re.search(r"step-(\d+)", resume)
    if match:
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
    emit("evaluation", stage="after", epoch=epochs, metrics={"recall_at_k": 0.75, "mrr": 0.5})
    emit("artifact", uri=f"{base}/", size=4096, sha256="0" * 64, files=3)
    emit("finished", artifact_uri=f"{base}/", duration_seconds=round(time.time() - t0, 3))
    say("stand-in trainer: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
