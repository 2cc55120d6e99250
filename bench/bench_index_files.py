"""`semsearch index FOLDER` at the issue's size: 200 generated files (Markdown, HTML, text, Word, PDF
with Chinese text) plus damaged and unsupported ones, indexed the README's way (one process per
command), then re-run (must write 0), then one file removed and `--prune` (must delete 1).

Prints one JSON object per step (wall time of the process, the job's own elapsed time, totals) and
checks what tests/test_indexer_files.py checks on 50 files: every file's marker sentence finds it.

    .venv/bin/python bench/bench_index_files.py [--files 200] [--model use-multilingual-v3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semsearch.config import Settings
from semsearch.store import MilvusStore
from tests.docfiles import make_doc, write_folder, write_pdf


def index(root: Path, common: list[str], *extra: str) -> dict[str, Any]:
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "semsearch", "index", str(root), *common, *extra, "--json"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"semsearch index failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    summary["process_s"] = round(time.perf_counter() - began, 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--model", default="use-multilingual-v3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "docs"
        docs = write_folder(root, args.files)
        (root / "broken.docx").write_bytes(b"PK\x03\x04 damaged")
        (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
        write_pdf(make_doc(10_000, "pdf"), root / "secret.pdf", encrypt_password="s3cret")
        (root / "logo.png").write_bytes(b"\x89PNG\r\n")
        common = ["--collection", "files", "--milvus-uri", str(Path(tmp) / "milvus.db"), "--model", args.model,
                  "--state-dir", str(Path(tmp) / "state"), "--progress", "off"]
        for step, extra in (("first", ()), ("rerun", ()), ("prune", ("--prune",))):
            if step == "prune":
                (root / docs[0].name).unlink()
            summary = index(root, common, *extra)
            totals = summary["totals"]
            print(json.dumps({"step": step, "process_s": summary["process_s"], "job_s": summary["elapsed_s"],
                              **{k: totals.get(k, 0) for k in ("documents", "written", "skipped", "rejected",
                                                               "pruned", "chunks_written")},
                              "notes": summary["notes"][:1]}, ensure_ascii=False))
        store = MilvusStore.from_settings(Settings(milvus_uri=str(Path(tmp) / "milvus.db"), collection="files"))
        try:
            physical = store.resolve("files")
            store.load(physical)
            hits = store.search(physical, texts=[doc.marker for doc in docs[1:]], top_k=1, per_document=True)
            found = sum(h[0].doc_id == doc.name for h, doc in zip(hits, docs[1:], strict=True))
            gone = not store.document_rows(physical, [docs[0].name])
        finally:
            store.close()
        print(json.dumps({"found_by_marker": f"{found}/{len(docs) - 1}", "removed_file_pruned": gone}))


if __name__ == "__main__":
    main()
