"""`layervault up` (agent + coordinator on S3) in a child process, as a user would run it."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time
from typing import Sequence


class Up:
    """One `layervault up` child; ``info["agent"]`` is the address ranks dial."""

    def __init__(self, storage: str, staging_mib: int, workdir: pathlib.Path, tag: str = "",
                 options: Sequence[str] = ()) -> None:
        """``options``: more `layervault up` flags (``--chunk-mib 8``...), for bench/focus.py."""
        name = f"{staging_mib}{tag}"
        ready = workdir / f"up-{name}.json"
        ready.unlink(missing_ok=True)
        self.log = workdir / f"up-{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "layervault.cli", "--log-level", "WARNING", "up", "--storage", storage,
             "--socket", str(workdir / f"agent-{name}.sock"), "--staging-mib", str(staging_mib),
             "--ready-file", str(ready), *options], stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"layervault up failed; see {self.log}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Up":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
