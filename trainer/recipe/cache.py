"""The step cache: each step's output lives in `<work_dir>/<step>-<key>/`, where the key hashes
everything it depends on, and is done when its `.done.json` marker exists (written last, atomically)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.recipe.schema import Recipe

DONE = ".done.json"


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


def model_identity(model: str) -> str:
    """What a model reference stands for: a local directory's weights hash, else the hub id."""
    from semsearch.manifest import weights_hash

    path = Path(model)
    return f"dir:{weights_hash(path)}" if path.is_dir() else f"ref:{model}"


def step_key(name: str, inputs: dict[str, Any]) -> str:
    blob = json.dumps({"step": name, **inputs}, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class StepRecord:
    name: str
    key: str
    dir: Path
    status: str  # ran | skipped | resumed
    wall_s: float
    result: dict[str, Any]


class Stop(Exception):
    """Raised after the step named by `until` has finished."""


@dataclass
class Run:
    recipe: Recipe
    stream_output: bool = True
    echo: Callable[[str], None] = print
    until: str | None = None
    records: list[StepRecord] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def work(self) -> Path:
        assert self.recipe.work_dir is not None
        return self.recipe.work_dir

    def settings(self) -> Any:
        from semsearch.config import load_settings

        overrides: dict[str, Any] = {"device": self.recipe.device, "encoder_url": None}
        if self.recipe.threads:
            overrides["torch_threads"] = self.recipe.threads
        return load_settings(None, **overrides)

    def step(self, name: str, inputs: dict[str, Any], work: Callable[[Path, bool], dict[str, Any]]) -> StepRecord:
        """Run `work(dir, resuming)` unless its output for these inputs is done already."""
        key = step_key(name, inputs)
        out = self.work / f"{name}-{key}"
        marker = out / DONE
        number = len(self.records) + 1
        if marker.exists():
            done = json.loads(marker.read_text(encoding="utf-8"))
            record = StepRecord(name, key, out, "skipped", done.get("wall_s", 0.0), done.get("result", {}))
            self.echo(f"[{number}] {name}: done ({out.name}), skipped")
        else:
            resuming = out.exists() and any(out.iterdir())
            self.echo(f"[{number}] {name}: {'resuming' if resuming else 'running'} in {out}")
            out.mkdir(parents=True, exist_ok=True)
            (out / "inputs.json").write_text(json.dumps(inputs, indent=2, default=str, ensure_ascii=False), "utf-8")
            started = time.perf_counter()
            result = work(out, resuming)
            wall = round(time.perf_counter() - started, 1)
            write_atomic(marker, json.dumps({"step": name, "key": key, "wall_s": wall, "result": result,
                                              "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
                                             indent=2, default=str, ensure_ascii=False))
            record = StepRecord(name, key, out, "resumed" if resuming else "ran", wall, result)
            self.echo(f"[{number}] {name}: finished in {wall:.0f} s")
        self.records.append(record)
        if name == self.until:
            raise Stop
        return record
