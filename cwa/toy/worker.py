"""Toy model build in a child process (``python -m cwa.toy.worker REQUEST_JSON``).

Why a child process: training pins torch's global state (thread count, deterministic
algorithms, denormal flushing), and the OpenMP runtime reads its waiting policy only from the
environment at start-up. By default OpenMP threads spin for a long time at every barrier; on a
busy machine (two processes with two threads each on two cores) that makes a training step
40 times slower. The child starts with a short spin count (``GOMP_SPINCOUNT`` /
``KMP_BLOCKTIME``, unless the caller set them), which costs nothing on an idle machine and keeps
a loaded one usable; the caller's process keeps its own settings untouched.

The child reports over stdout, one JSON object per line: ``task`` / ``advance`` / ``close`` /
``info`` / ``warn`` events for the parent's reporter, then ``done`` with the figures or
``error`` with the error class and message. Nothing here is shown to a user directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cwa.errors import CwaError
from cwa.progress import NULL_REPORTER, Reporter, TaskHandle

SPIN_ENV = {"GOMP_SPINCOUNT": "3000", "KMP_BLOCKTIME": "1"}


class _PipeReporter:
    """A reporter that writes its events as JSON lines to stdout (child side)."""

    def _send(self, **event: object) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def task(self, description: str, total: int | None = None) -> TaskHandle:
        self._send(event="task", description=description, total=total)
        send = self._send

        class _Handle:
            def advance(self, n: int = 1) -> None:
                send(event="advance", n=n)

            def close(self) -> None:
                send(event="close")

        return _Handle()

    def info(self, message: str) -> None:
        self._send(event="info", message=message)

    def warn(self, message: str) -> None:
        self._send(event="warn", message=message)


def run_build_in_child(
    folder: Path, variant: str, config_dict: dict, cache_dir: str | None,
    reporter: Reporter | None = None,
) -> dict:
    """Run :func:`cwa.toy.cache.build_toy_model` in a child process; return its figures."""
    from cwa.toy.cache import ToyBuildError

    reporter = reporter or NULL_REPORTER
    request = {"folder": str(folder), "variant": variant, "config": config_dict,
               "cache_dir": cache_dir}
    env = dict(os.environ)
    for key, value in SPIN_ENV.items():
        env.setdefault(key, value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # the child must import this very cwa, wherever it is
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, env.get("PYTHONPATH", "")) if p
    )
    handle: TaskHandle | None = None
    result: dict | None = None
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cwa.toy.worker", json.dumps(request)],
            stdout=subprocess.PIPE, stderr=stderr, env=env, text=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # stray output from a library; not part of the protocol
                kind = event.get("event")
                if kind == "task":
                    handle = reporter.task(event["description"], event["total"])
                elif kind == "advance" and handle is not None:
                    handle.advance(event["n"])
                elif kind == "close" and handle is not None:
                    handle.close()
                    handle = None
                elif kind in ("info", "warn"):
                    getattr(reporter, kind)(event["message"])
                elif kind in ("done", "error"):
                    result = event
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if handle is not None:
                handle.close()
        stderr.seek(0)
        tail = stderr.read()[-2000:]
    if result is not None and result["event"] == "done":
        return result["figures"]
    if result is not None:
        raise ToyBuildError(f"toy-{variant} build failed: {result['type']}: {result['message']}")
    last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
    raise ToyBuildError(
        f"toy-{variant} build process exited with code {proc.returncode} ({last}); "
        "rerun with CWA_DEBUG=1 or call cwa.toy.build_toy_model directly to see why"
    )


def main(argv: list[str]) -> int:
    from cwa.toy.cache import build_toy_model
    from cwa.toy.recipe import ToyTrainConfig

    reporter = _PipeReporter()
    request = json.loads(argv[0])
    try:
        figures = build_toy_model(
            request["folder"], request["variant"],
            config=ToyTrainConfig(**request["config"]),
            cache_dir=request["cache_dir"], reporter=reporter,
        )
    except CwaError as exc:
        reporter._send(event="error", type=type(exc).__name__, message=str(exc))
        return 1
    reporter._send(event="done", figures=figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
