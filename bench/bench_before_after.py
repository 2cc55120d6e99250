"""A refactor's cost, measured in one run: the service's own overhead and the indexer's throughput of
two checkouts, alternating (before, after, after, before, ...) so that load drifts hit both alike.

    git worktree add /tmp/before <commit>
    nice .venv/bin/python bench/bench_before_after.py --before /tmp/before [--after .] [--rounds 2]

Each side runs its own copy of bench/bench_service.py (gRPC search, MiniLM, Milvus Lite; p50 overhead at
concurrency 1 = client latency - encode - store) and bench/bench_indexer.py (CMRC2018 passages,
indexer chunks/s over the bare encoder's), with that checkout first on PYTHONPATH and this venv.
Prints medians per side and after/before ratios; --out writes every number as JSON. Settings come from
the environment as usual: pin what changed default between the two (e.g. SEMSEARCH_RETRIEVAL_MODE=dense)
to compare the code, not the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_side(checkout: Path, script: str, args: list[str], out: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    subprocess.run([sys.executable, f"bench/{script}", *args, str(out)], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def measure(checkout: Path, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    service = run_side(checkout, "bench_service.py", ["--requests", str(args.requests), "--json-out"],
                       tmp / "service.json")
    rows: dict[str, dict[str, float]] = service["rows"]  # type: ignore[assignment]
    measured = {"overhead_p50_ms": float(service["p50_overhead_ms"]),  # type: ignore[arg-type]
                **{f"search_rps_c{c}": float(rows[c]["rps"]) for c in ("1", "8", "32")},
                **{f"search_p50_ms_c{c}": float(rows[c]["p50"]) for c in ("1", "8", "32")}}
    if args.skip_indexer:
        return measured
    indexer = run_side(checkout, "bench_indexer.py", [
        "--skip-memory", "--rounds", "1", "--max-passages", str(args.max_passages),
        "--data-dir", str(args.data_dir), "--out"], tmp / "indexer.json")
    throughput = indexer["throughput"]
    assert isinstance(throughput, dict)
    return {**measured, "index_chunks_per_s": float(throughput["passes"][0]["index_chunks_per_s"]),
            "index_over_bare": float(throughput["ratio_median"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the older checkout (e.g. a git worktree)")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of measurements per side")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-passages", type=int, default=400)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "cmrc2018")
    parser.add_argument("--skip-indexer", action="store_true", help="the service benchmark only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    order = [name for i in range(args.rounds) for name in (("before", "after") if i % 2 == 0 else ("after", "before"))]
    with tempfile.TemporaryDirectory() as tmp:
        for step, name in enumerate(order, 1):
            results[name].append(measure(sides[name], args, Path(tmp)))
            print(f"[{step}/{len(order)}] {name}: {results[name][-1]}", flush=True)
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items()}
    print(f"\n{'metric':<20} {'before':>10} {'after':>10} {'after/before':>13}")
    for key in medians["before"]:
        before, after = medians["before"][key], medians["after"][key]
        print(f"{key:<20} {before:>10.2f} {after:>10.2f} {after / before:>13.3f}")
    print(f"load average at the end: {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps({"sides": {k: str(v) for k, v in sides.items()}, "runs": results,
                                        "medians": medians}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
