"""The job checkpoint: one SQLite file per job in the state directory.

It records what is durably in Milvus, never what was merely sent: the writer commits a batch here
only after Milvus acknowledged it and a flush made it durable. A commit holds, in one transaction,
the input position after the last durable batch, the ids of the documents it covered (for duplicate
detection and --prune), the running totals and the length of the reject file.

A crash between the Milvus write and this commit only means the next run re-sends some documents:
row ids are deterministic (`{doc_id}#{chunk}`) and writes are upserts, so nothing is duplicated.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.sources import Position
from semsearch.config import default_data_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS job (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- ok=1: written or verified unchanged; ok=0: a rejected row whose id is known (kept by --prune)
CREATE TABLE IF NOT EXISTS seen (
    doc_id TEXT PRIMARY KEY, file INTEGER NOT NULL, line INTEGER NOT NULL, ok INTEGER NOT NULL
) WITHOUT ROWID;
"""
STATUS_RUNNING = "running"
STATUS_DONE = "done"


def default_state_dir() -> Path:
    return default_data_dir() / "index-jobs"


def job_id_for(collection: str, shard: tuple[int, int], identity: dict[str, Any]) -> str:
    """Readable and deterministic: the same command (same inputs and options) finds its own job."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", collection)[:60]
    suffix = f"-shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""
    return f"{name}{suffix}-{digest}"


class JobLockedError(Exception):
    pass


@dataclass
class Progress:
    position: Position
    totals: dict[str, int]
    reasons: dict[str, int]  # reject kind -> count
    reject_bytes: int
    phase: str  # index, prune, alias, done

    def to_json(self) -> dict[str, Any]:
        return {"position": self.position.to_json(), "totals": self.totals, "reasons": self.reasons,
                "reject_bytes": self.reject_bytes, "phase": self.phase}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        return cls(Position.from_json(data["position"]), dict(data["totals"]), dict(data.get("reasons", {})),
                   int(data["reject_bytes"]), str(data["phase"]))

    @classmethod
    def start(cls) -> Progress:
        return cls(Position(), {}, {}, 0, "index")


class JobState:
    """The checkpoint of one job, locked against a second process running the same job."""

    def __init__(self, state_dir: Path, job_id: str, *, lock: bool = True) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.job_id = job_id
        self.path = state_dir / f"{job_id}.sqlite"
        self._lock_file: Any = None
        if lock:
            self._lock_file = open(state_dir / f"{job_id}.lock", "a+")  # noqa: SIM115
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                self._lock_file.close()
                raise JobLockedError(f"job {job_id} is running in another process ({self.path})") from exc
        self._db = self._connect()
        self._db.executescript(SCHEMA)
        self._mutex = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (fsync) before it returns, so the checkpoint survives power loss.
        db.execute("PRAGMA synchronous=FULL")
        return db

    @property
    def reject_path_default(self) -> Path:
        return self.path.with_suffix(".rejects.jsonl")

    # ------------------------------------------------------------------ key/value
    def get(self, key: str) -> Any:
        with self._mutex:
            row = self._db.execute("SELECT value FROM job WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Any) -> None:
        with self._mutex:
            self._db.execute("INSERT OR REPLACE INTO job (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def exists(self) -> bool:
        return self.get("config") is not None

    @property
    def status(self) -> str | None:
        value = self.get("status")
        return str(value) if value is not None else None

    def progress(self) -> Progress:
        data = self.get("progress")
        return Progress.from_json(data) if data else Progress.start()

    def reset(self, config: dict[str, Any]) -> None:
        """Start this job over: forget every document and position."""
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM seen")
            self._db.execute("DELETE FROM job")
            for key, value in (("config", config), ("status", STATUS_RUNNING),
                               ("progress", Progress.start().to_json()), ("started_at", time.time())):
                self._db.execute("INSERT INTO job (key, value) VALUES (?, ?)", (key, json.dumps(value)))
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ checkpoints
    def commit(self, seen: Sequence[tuple[str, int, int, int]], progress: Progress) -> None:
        """One durable step: the documents of the batches now safe in Milvus, and the new position."""
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # ok=0 never overwrites ok=1: a later rejected duplicate must not hide a written document.
                self._db.executemany(
                    "INSERT INTO seen (doc_id, file, line, ok) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(doc_id) DO UPDATE SET ok = max(ok, excluded.ok)",
                    seen,
                )
                self._db.execute("INSERT OR REPLACE INTO job (key, value) VALUES ('progress', ?)",
                                 (json.dumps(progress.to_json()),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def set_phase(self, progress: Progress, phase: str) -> None:
        progress.phase = phase
        self.put("progress", progress.to_json())

    def finish(self, progress: Progress) -> None:
        progress.phase = "done"
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO job (key, value) VALUES ('progress', ?)",
                             (json.dumps(progress.to_json()),))
            self._db.execute("INSERT OR REPLACE INTO job (key, value) VALUES ('status', ?)",
                             (json.dumps(STATUS_DONE),))
            self._db.execute("INSERT OR REPLACE INTO job (key, value) VALUES ('finished_at', ?)",
                             (json.dumps(time.time()),))
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ documents seen
    def written(self, doc_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """The ids among these already committed as written, with their (file index, line)."""
        ids = list(doc_ids)
        found: dict[str, tuple[int, int]] = {}
        with self._mutex:
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                marks = ",".join("?" * len(part))
                for doc_id, file, line in self._db.execute(
                    f"SELECT doc_id, file, line FROM seen WHERE ok = 1 AND doc_id IN ({marks})", part
                ):
                    found[doc_id] = (int(file), int(line))
        return found

    def known(self, doc_ids: Iterable[str]) -> set[str]:
        """The ids among these that the source holds (written or rejected with an id)."""
        ids = list(doc_ids)
        found: set[str] = set()
        with self._mutex:
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                marks = ",".join("?" * len(part))
                found.update(row[0] for row in self._db.execute(
                    f"SELECT doc_id FROM seen WHERE doc_id IN ({marks})", part))
        return found

    def seen_count(self, ok: int = 1) -> int:
        with self._mutex:
            return int(self._db.execute("SELECT count(*) FROM seen WHERE ok = ?", (ok,)).fetchone()[0])

    def close(self) -> None:
        self._db.close()
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()


def list_jobs(state_dir: Path) -> Iterator[tuple[str, dict[str, Any], str | None, float]]:
    """(job id, config, status, last modified) of every job in the state directory."""
    if not state_dir.is_dir():
        return
    for path in sorted(state_dir.glob("*.sqlite")):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                rows = dict(db.execute("SELECT key, value FROM job WHERE key IN ('config', 'status')").fetchall())
            finally:
                db.close()
        except sqlite3.Error:
            continue
        if "config" not in rows:
            continue
        status = json.loads(rows["status"]) if "status" in rows else None
        yield path.stem, json.loads(rows["config"]), status, os.path.getmtime(path)


def read_progress(state_dir: Path, job_id: str) -> Progress | None:
    """The committed progress of a job, read without taking its lock (for monitoring and tests)."""
    path = state_dir / f"{job_id}.sqlite"
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT value FROM job WHERE key = 'progress'").fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return Progress.from_json(json.loads(row[0])) if row else None
