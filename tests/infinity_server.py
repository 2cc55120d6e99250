"""A real third-party OpenAI-compatible server for contract tests: infinity-emb, run from its own
virtualenv (`.venv-infinity/`, made by scripts/setup.sh; `SEMSEARCH_INFINITY_VENV` points elsewhere),
offline, on CPU, on a free loopback port. It serves /embeddings, /models and /rerank (cross-encoders),
at the root by default (infinity's layout has no /v1) or under `url_prefix`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def infinity_executable() -> Path | None:
    """The `infinity_emb` command of the infinity virtualenv; None when it is not installed."""
    venv = Path(os.environ.get("SEMSEARCH_INFINITY_VENV", REPO / ".venv-infinity"))
    executable = venv / "bin" / "infinity_emb"
    return executable if executable.exists() else None


class InfinityServer:
    """`with InfinityServer(model_dir) as server:` then `server.url`; `kill()` and `start()` again
    to bring it back on the same port."""

    def __init__(self, model_dir: str | Path, *, served_name: str | None = None, url_prefix: str = "",
                 port: int | None = None, extra_args: tuple[str, ...] = (), engine: str = "torch",
                 venv: Path | None = None, env: dict[str, str] | None = None) -> None:
        executable = infinity_executable() if venv is None else venv / "bin" / "infinity_emb"
        if executable is None or not executable.exists():
            raise RuntimeError(f"infinity is not installed ({executable or '.venv-infinity/'}): "
                               "run bash scripts/setup.sh (creates .venv-infinity/)")
        self.executable = executable
        self.engine = engine
        self.env = env or {}
        self.model_dir = str(model_dir)
        self.served_name = served_name
        self.url_prefix = url_prefix.rstrip("/")
        self.port = port or free_port()
        self.extra_args = extra_args
        self._workdir = tempfile.TemporaryDirectory(prefix="infinity-")
        self.log_path = Path(self._workdir.name) / "infinity.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.url_prefix}"

    def command(self) -> list[str]:
        args = [str(self.executable), "v2", "--model-id", self.model_dir, "--host", "127.0.0.1",
                "--port", str(self.port), "--device", "cpu", "--engine", self.engine, "--no-model-warmup",
                "--no-vector-disk-cache", "--log-level", "warning"]
        if self.served_name:
            args += ["--served-model-name", self.served_name]
        if self.url_prefix:
            args += ["--url-prefix", self.url_prefix]
        return args + list(self.extra_args)

    def start(self, timeout_s: float = 180.0) -> InfinityServer:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": "", **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=self._workdir.name, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"infinity exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                # /health stays at the root whatever --url-prefix says.
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"infinity did not answer /health within {timeout_s:.0f}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> InfinityServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self._workdir.cleanup()
