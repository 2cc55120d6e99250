"""In-process encoder backends side by side on the same model and texts: PyTorch (TorchEncoder), ONNX
Runtime fp32 and int8 (OnnxEncoder), and sentence-transformers' `encode` as the outside peer.

For each thread count (`--threads 1,2`) every backend encodes the same texts with the same batch size
and token limit, warmed up, then timed in rotating order (repetition after repetition) so that load
from other processes hits all alike. Reported per backend: median texts/s and its ratio to PyTorch,
single short query latency p50/p99 (each query timed on every backend in turn) and its ratio, and the
minimum cosine of its vectors to PyTorch's. Then, with the BQ data present, the held-out split's
recall@10 per semsearch backend (test pool) and the share of queries whose top-10 ranking equals PyTorch's.
Targets (issue 16): ONNX fp32 >= 2x PyTorch throughput, <= 0.5x its single-query p50, identical
rankings; int8 recall@10 within 1 point of PyTorch's. On CPU each table ends with the ceiling: the
matrix-product GFLOP of a pass (from the model config and the batch shapes) against this CPU's fp32
GEMM peak measured in the same run. `infinity-optimum` adds infinity-emb's ONNX engine over HTTP as the
outside peer (bash bench/setup_infinity_optimum.sh makes its virtualenv).

Model: by default the vocabulary-extended MiniLM (`trainer/vocab.py`, the BQ training split's
characters added to the packaged all-MiniLM-L6-v2, built in a temporary directory in seconds) when
../shared/data/bq is present, else the packaged MiniLM stand-in. Texts: `--texts bq` (default): short
BQ customer questions; `--texts passages`: the FAQ plus CMRC2018 passages (long).

    .venv/bin/python bench/bench_encoder.py                        # CPU: all backends, 1 and 2 threads
    .venv/bin/python bench/bench_encoder.py --backends torch,st --texts passages --threads 0
    python bench/bench_encoder.py --device cuda --random-bge-large --backends torch,st --max-texts 2048 --batch-size 64

`--random-bge-large` builds, in a temporary directory, a BERT with bge-large-zh-v1.5's exact shape
(24 layers, hidden 1024, 16 heads, intermediate 4096, vocab 21128, 512 positions) and random
weights, a character-level Chinese tokenizer, a semsearch manifest (CLS pooling, BGE instruction)
and a sentence-transformers config with CLS pooling, so both libraries pool the same way. On
CUDA, torch and ST run in float16 (ours by default; ST through `.half()` after loading); ONNX is
CPU only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import rotate  # noqa: E402

from semsearch.encoders.local import STAND_IN_MODEL, TorchEncoder, locate_model  # noqa: E402
from semsearch.manifest import BGE_ZH_INSTRUCTION, ModelManifest, resolve_manifest  # noqa: E402

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
BQ_FILE = DATA_DIR / "bq" / "BQ.train.tsv"

SHORT_QUERIES = ["退钱怎么操作？", "包裹好几天没动静了", "手机开不了机", "密码忘了登不上去", "发票抬头写错了能改吗",
                 "保修期是多久", "会员积分怎么用", "可以分期付款吗", "how do I get a refund", "where is my parcel"]

BGE_LARGE_SHAPE: dict[str, Any] = {
    "vocab_size": 21128, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "intermediate_size": 4096, "max_position_embeddings": 512, "type_vocab_size": 2,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
}


# ---------------------------------------------------------------------------------------------- texts
def faq_texts() -> list[str]:
    path = Path(str(resources.files("service") / "data" / "faq.jsonl"))
    if not path.exists():  # running from a checkout without the package installed
        path = REPO_ROOT / "service" / "data" / "faq.jsonl"
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def cmrc_passages(data_dir: Path) -> list[str]:
    passages: list[str] = []
    seen: set[str] = set()
    for name in ("cmrc2018_dev.json", "cmrc2018_trial.json"):
        path = data_dir / "cmrc2018" / name
        if not path.exists():
            continue
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"].strip()
                if context and context not in seen:
                    seen.add(context)
                    passages.append(context)
    return passages


def passage_texts(max_texts: int) -> tuple[list[str], str]:
    faq = faq_texts()
    cmrc = cmrc_passages(DATA_DIR)
    texts = faq + cmrc
    source = f"{len(faq)} FAQ texts + {len(cmrc)} CMRC2018 passages" if cmrc else f"{len(faq)} FAQ texts (no CMRC2018)"
    if len(texts) < max_texts:  # repeat to reach the size asked for (a small corpus, a big GPU batch)
        texts = (texts * (max_texts // len(texts) + 1))
    return texts[:max_texts], source


# ------------------------------------------------------------------------------- random bge-large model
def chinese_vocab(size: int) -> list[str]:
    """BERT-Chinese layout: [PAD], [unused1..99], [UNK], [CLS], [SEP], [MASK], then single characters."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    seen = set(vocab)

    def add(token: str) -> None:
        if len(vocab) < size and token not in seen:
            seen.add(token)
            vocab.append(token)

    for code in range(0x21, 0x7F):  # ASCII printable, lower-case letters only (the tokenizer lower-cases)
        ch = chr(code)
        if not ch.isupper():
            add(ch)
    for code in range(0x21, 0x7F):  # word pieces "##x", so ASCII words do not all become [UNK]
        ch = chr(code)
        if ch.isalnum() and not ch.isupper():
            add("##" + ch)
    for start, stop in ((0x3000, 0x3040), (0xFF01, 0xFF5F), (0x2010, 0x2030)):  # CJK and full-width punctuation
        for code in range(start, stop):
            add(chr(code))
    code = 0x4E00
    while len(vocab) < size and code <= 0x9FFF:
        add(chr(code))
        code += 1
    if len(vocab) < size:
        vocab += [f"[unused{i}]" for i in range(100, 100 + size - len(vocab))]
    return vocab


def write_bert_tokenizer(target: Path, vocab: list[str], *, max_length: int) -> None:
    """A BERT-Chinese style WordPiece tokenizer as tokenizer.json + vocab.txt + config, built with the
    `tokenizers` library alone, so transformers 4.x and 5.x both load it the same way."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    (target / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        tokenizer.add_special_tokens([token])
    tokenizer.save(str(target / "tokenizer.json"))
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
    (target / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
        "strip_accents": None, "model_max_length": max_length, "clean_up_tokenization_spaces": True, **specials,
    }, indent=2))


def build_random_bge_large(target: Path, *, seed: int = 0) -> Path:
    """A random-weight BERT with bge-large-zh-v1.5's exact configuration, loadable by both libraries."""
    from transformers import BertConfig, BertModel

    config = BertConfig(**BGE_LARGE_SHAPE)
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(str(target))  # float32 safetensors, like the published checkpoint
    del model
    write_bert_tokenizer(target, chinese_vocab(BGE_LARGE_SHAPE["vocab_size"]), max_length=512)
    ModelManifest(
        name="bge-large-zh-v1.5-random", version=f"bge-large-zh-v1.5-random-seed{seed}", pooling="cls",
        normalize=True, query_instruction=BGE_ZH_INSTRUCTION, dimension=1024, max_tokens=512,
    ).save(target)
    # sentence-transformers: Transformer -> CLS pooling -> Normalize, as bge-large-zh-v1.5 ships it.
    (target / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (target / "1_Pooling").mkdir(exist_ok=True)
    (target / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 1024, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    (target / "2_Normalize").mkdir(exist_ok=True)
    return target


def bq_split() -> Any:
    """The trainer's split of BQ (15% of intents held out, seed 42), as in trainer/RESULTS.md."""
    from trainer.prepare import prepare

    return prepare(labelled=[BQ_FILE], test_ratio=0.15, seed=42)


def bq_texts(max_texts: int) -> tuple[list[str], str]:
    questions: dict[str, None] = {}
    for line in BQ_FILE.read_text(encoding="utf-8").splitlines():
        for text in line.split("\t")[:2]:
            if text.strip():
                questions[text.strip()] = None
    texts = list(questions)[:max_texts]
    return texts, f"{len(texts)} distinct BQ questions"


def extended_minilm(target: Path, split: Any) -> Path:
    """all-MiniLM-L6-v2 with the BQ training split's characters added (untrained new rows, seed 0)."""
    from trainer.rows import candidate_texts
    from trainer.vocab import extend_vocabulary

    texts = [row.query for row in split.train] + candidate_texts(split.train)
    extend_vocabulary(STAND_IN_MODEL, texts, target, always=BGE_ZH_INSTRUCTION, name="minilm-zh")
    return target


# ----------------------------------------------------------------------------------------- measuring
@dataclass
class Backend:
    """One way of encoding: documents in batches, and single queries (instruction included)."""

    name: str
    documents: Callable[[Sequence[str]], np.ndarray]
    queries: Callable[[Sequence[str]], np.ndarray]
    seconds: list[float] = field(default_factory=list)
    query_ms: list[float] = field(default_factory=list)
    vectors: np.ndarray | None = None


def timed(fn: Callable[[], np.ndarray], device: torch.device) -> tuple[float, np.ndarray]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()  # every backend returns host numpy arrays, so the work is done when they return
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def describe_pooling(module: Any) -> str:
    """The pooling mode of an ST Pooling module, across sentence-transformers versions."""
    mode = getattr(module, "pooling_mode", None)  # 5.x: a string such as "cls" or "mean"
    if isinstance(mode, str):
        return f"({mode})"
    if hasattr(module, "pooling_mode_cls_token"):  # older: one flag per mode
        return "(cls)" if module.pooling_mode_cls_token else "(mean)" if module.pooling_mode_mean_tokens else "(?)"
    return ""


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


class Setup:
    """The model, its manifest and every backend's encoder (ONNX sessions per thread count)."""

    def __init__(self, args: argparse.Namespace, model_ref: str, model_dir: Path) -> None:
        self.args = args
        self.model_dir = model_dir
        self.manifest = resolve_manifest(model_dir, model_ref)
        self.torch = TorchEncoder(model_dir, self.manifest, device=args.device, batch_size=args.batch_size)
        self.device = self.torch.device
        self.onnx_paths: dict[str, Path] = {}
        self.export_s: dict[str, float] = {}
        if {"onnx", "onnx-int8"} & set(args.backends):
            from semsearch.encoders.onnx import default_cache_dir, export_model

            cache = args.onnx_cache_dir or default_cache_dir()
            for name in ("onnx", "onnx-int8"):
                if name in args.backends:
                    started = time.perf_counter()
                    self.onnx_paths[name] = export_model(model_dir, self.manifest, cache, quantize=name == "onnx-int8")
                    self.export_s[name] = time.perf_counter() - started
        self.peer: InfinityPeer | None = None
        if "infinity-optimum" in args.backends:
            self.peer = InfinityPeer(model_dir, self.manifest, args.infinity_venv, args.batch_size)
        self.st: Any = None
        if "st" in args.backends:
            from sentence_transformers import SentenceTransformer

            self.st = SentenceTransformer(str(model_dir), device=str(self.device))
            if next(self.torch.model.parameters()).dtype != torch.float32:
                self.st.half()  # same dtype as ours (float16 on CUDA)
            self.st.max_seq_length = self.torch.max_tokens

    def backends(self, threads: int) -> list[Backend]:
        from semsearch.encoders.onnx import OnnxEncoder, int8_manifest

        out: list[Backend] = []
        for name in self.args.backends:
            if name == "torch":
                out.append(Backend("PyTorch (TorchEncoder)", self.torch.encode_documents, self.torch.encode_queries))
            elif name in self.onnx_paths:
                manifest = int8_manifest(self.manifest) if name == "onnx-int8" else self.manifest
                encoder = OnnxEncoder(self.model_dir, manifest, self.onnx_paths[name], batch_size=self.args.batch_size,
                                      threads=threads or None)
                label = "ONNX Runtime int8" if name == "onnx-int8" else "ONNX Runtime fp32"
                out.append(Backend(label, encoder.encode_documents, encoder.encode_queries))
            elif name == "st":
                out.append(Backend("sentence-transformers", self.st_documents, self.st_queries))
            elif name == "infinity-optimum" and self.peer is not None and threads in (0, os.cpu_count()):
                # onnxruntime's default threads (the cores) inside infinity: compared where ours use as many.
                out.append(Backend("infinity-emb optimum (HTTP)", self.peer.documents, self.peer.queries))
        return out

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()

    def st_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self.st.encode(list(texts), batch_size=self.args.batch_size, normalize_embeddings=True,  # type: ignore[no-any-return]
                              convert_to_numpy=True, show_progress_bar=False)

    def st_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.st_documents([self.manifest.apply_query_instruction(q) for q in queries])


class InfinityPeer:
    """The outside peer for ONNX: infinity-emb's optimum engine (ONNX Runtime; optimum's ORTOptimizer
    fuses the graph) from its own virtualenv (bench/setup_infinity_optimum.sh), on loopback, over HTTP.
    It is given the model directory plus the plain (unfused) TorchScript export of the transformer as
    `model.onnx`: optimum 1.x's own exporter needs torch's dynamo exporter, which fails on torch 2.13
    there, and infinity loads a directory that has an ONNX file."""

    def __init__(self, model_dir: Path, manifest: Any, venv: Path, batch_size: int) -> None:
        import shutil

        import httpx

        from semsearch.encoders.onnx import export_unfused
        from tests.infinity_server import InfinityServer

        if not (venv / "bin" / "infinity_emb").exists():
            raise SystemExit(f"no infinity_emb in {venv}: run bash bench/setup_infinity_optimum.sh first")
        self.manifest = manifest
        self._workdir = tempfile.TemporaryDirectory(prefix="bench-infinity-")
        exported = Path(self._workdir.name) / "model"
        started = time.perf_counter()
        shutil.copytree(model_dir, exported, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
        reference = TorchEncoder(model_dir, manifest, device="cpu")
        export_unfused(reference, exported / "model.onnx")
        reference.close()
        self.server = InfinityServer(
            exported, served_name="peer", engine="optimum", venv=venv,
            extra_args=("--batch-size", str(batch_size), "--pooling-method", manifest.pooling),
            env={"HF_HOME": str(Path(self._workdir.name) / "hf")},
        ).start(timeout_s=600)
        print(f"infinity-emb (optimum engine) serving the model's ONNX export on {self.server.url}, "
              f"export + optimize + start {time.perf_counter() - started:.0f} s", flush=True)
        self.client = httpx.Client(timeout=600)

    def documents(self, texts: Sequence[str]) -> np.ndarray:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), 1024):  # infinity's limit on inputs per request is 2048
            response = self.client.post(f"{self.server.url}/embeddings",
                                        json={"model": "peer", "input": list(texts[start : start + 1024])})
            response.raise_for_status()
            vectors += [row["embedding"] for row in sorted(response.json()["data"], key=lambda r: r["index"])]
        return np.asarray(vectors, dtype=np.float32)

    def queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.documents([self.manifest.apply_query_instruction(q) for q in queries])

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self._workdir.cleanup()


def measure_threads(setup: Setup, threads: int, texts: list[str]) -> list[Backend]:
    args = setup.args
    if threads:
        torch.set_num_threads(threads)
    backends = setup.backends(threads)
    # Warm-up on the longest texts as well as short ones. On CUDA, each new (batch, length) shape pays once
    # for allocator growth and kernel selection (a first full pass ran 2.5x slower than the next on an H100),
    # so there every backend makes one full untimed pass first.
    by_length = sorted(texts, key=len, reverse=True)
    warm_sets = [by_length[: args.batch_size], by_length[len(by_length) // 2 :][: args.batch_size],
                 by_length[-args.batch_size :]]
    if setup.device.type == "cuda":
        warm_sets.append(texts)
    for backend in backends:
        for warm in warm_sets:
            backend.documents(warm)
    for rep in range(args.repeats):
        for backend in rotate(backends, rep):
            seconds, backend.vectors = timed(functools.partial(backend.documents, texts), setup.device)
            backend.seconds.append(seconds)
        print(f"  threads {threads or 'default'} · repetition {rep + 1}/{args.repeats}: " + ", ".join(
            f"{b.name} {len(texts) / b.seconds[-1]:.0f}" for b in backends) + " texts/s", flush=True)
    # Single short queries, one at a time (what the service does at low load), every backend in turn.
    for _ in range(2):
        for q in SHORT_QUERIES:
            for backend in backends:
                backend.queries([q])
    for i in range(args.queries):
        q = SHORT_QUERIES[i % len(SHORT_QUERIES)]
        for backend in rotate(backends, i):
            backend.query_ms.append(timed(functools.partial(backend.queries, [q]), setup.device)[0] * 1e3)
    return backends


def forward_gflop(config: Any, batches: Sequence[tuple[int, int]]) -> float:
    """Multiply-adds of the encoder's forward passes, in GFLOP, for (batch, padded length) shapes: per token
    and layer the Q/K/V/output projections (4h²) and the feed-forward (2hi) as matrix products, plus
    attention scores and weighted values (2Lh). Embeddings, norms and activations are left out (small)."""
    h, i, layers = int(config.hidden_size), int(config.intermediate_size), int(config.num_hidden_layers)
    return sum(layers * b * n * 2 * (4 * h * h + 2 * h * i + 2 * n * h) for b, n in batches) / 1e9


def batch_shapes(encoder: TorchEncoder, texts: Sequence[str]) -> list[tuple[int, int]]:
    """The (batch, padded length) shapes the encoder runs for these texts."""
    counts = [min(n, encoder.max_tokens) for n in encoder.count_tokens(texts)]
    return [(len(batch), max(counts[i] for i in batch)) for batch in encoder.batches(texts)]


def gemm_peak(threads: int, size: int = 1024, repeats: int = 20) -> dict[str, float]:
    """fp32 matrix-product GFLOP/s of this CPU with `threads` threads, through torch (MKL/oneDNN) and
    onnxruntime (MLAS): the ceiling any fp32 backend's encoder throughput is bounded by."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flop = 2 * size**3 / 1e9
    out: dict[str, float] = {}
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for _ in range(3):
        ta @ tb
    best = min(timed(lambda: (ta @ tb).numpy(), torch.device("cpu"))[0] for _ in range(repeats))
    out["torch"] = flop / best
    torch.set_num_threads(previous)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(["c"], {"a": a})
    best = min(timed(lambda: session.run(["c"], {"a": a})[0], torch.device("cpu"))[0] for _ in range(repeats))
    out["onnxruntime"] = flop / best
    return out


def print_table(backends: list[Backend], texts: int, threads: int, gflop: float,
                peak: dict[str, float] | None) -> list[dict[str, Any]]:
    base = backends[0]
    assert base.vectors is not None
    base_tps = texts / statistics.median(base.seconds)
    base_p50 = statistics.median(base.query_ms)
    print(f"\n**{threads or 'default'} thread(s)**\n")
    short = base.name.split()[0]
    print(f"| backend | texts/s | × {short} | GFLOP/s | query p50 ms | p99 ms | p50 × | min cosine to {short} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows: list[dict[str, Any]] = []
    for backend in backends:
        assert backend.vectors is not None
        seconds = statistics.median(backend.seconds)
        tps = texts / seconds
        p50 = statistics.median(backend.query_ms)
        cosine = min_cosine(backend.vectors, base.vectors)
        print(f"| {backend.name} | {tps:.1f} | {tps / base_tps:.2f} | {gflop / seconds:.1f} | {p50:.2f} | "
              f"{percentile(backend.query_ms, 99):.2f} | {p50 / base_p50:.2f} | {cosine:.6f} |")
        rows.append({"backend": backend.name, "threads": threads, "texts_per_s": tps,
                     "throughput_ratio": tps / base_tps, "gflop_per_s": gflop / seconds,
                     "query_p50_ms": p50, "query_p99_ms": percentile(backend.query_ms, 99),
                     "p50_ratio": p50 / base_p50, "min_cosine": cosine,
                     "texts_per_s_runs": [texts / s for s in backend.seconds]})
    if peak:
        best = max(peak.values())
        achieved = gflop / statistics.median(base.seconds)
        print(f"\nfp32 matrix-product peak with {threads or 'default'} thread(s), 1024² fp32 GEMM: "
              + ", ".join(f"{name} {value:.1f}" for name, value in peak.items())
              + f" GFLOP/s. {base.name} runs the encoder at {achieved:.1f} GFLOP/s ({achieved / best:.0%} of the "
              f"best), so an fp32 backend doing the same arithmetic is bounded by {best / achieved:.2f}x its "
              "throughput on this CPU.")
        rows.append({"gemm_peak_gflop_per_s": peak, "fp32_ceiling_ratio": best / achieved, "threads": threads})
    return rows


def bq_recall(setup: Setup, split: Any) -> list[dict[str, Any]]:
    """recall@10 on the held-out intents' test pool, and top-10 rankings compared with PyTorch's."""
    from trainer.encoding import ExactIndex
    from trainer.evaluate import _pool_metrics
    from trainer.rows import candidate_texts, normalize_text

    rows = split.test
    texts = candidate_texts(rows)
    keys = [normalize_text(t) for t in texts]
    query_keys = [normalize_text(r.query) for r in rows]
    relevant = [{normalize_text(p) for p in r.pos} for r in rows]
    local = {k: i for i, k in enumerate(keys)}
    exclude = [[local[q]] if q in local else [] for q in query_keys]
    print(f"\nBQ held-out split: {len(rows)} queries over a test pool of {len(texts)} candidates "
          f"(their own text excluded)\n")
    print("| backend | recall@10 | mrr@10 | ndcg@10 | top-10 identical to PyTorch | top-10 overlap | same top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    # sentence-transformers and infinity are left out: their vectors are PyTorch's (min cosine above).
    for backend in setup.backends(setup.args.threads[0]):
        if backend.name.startswith(("sentence-transformers", "infinity")):
            continue
        docs = backend.documents(texts)
        queries = backend.queries([r.query for r in rows])
        metrics = _pool_metrics(queries, docs, range(len(texts)), query_keys, relevant, keys)["metrics"]
        ranked, _ = ExactIndex(docs).search(queries, 10, exclude=exclude)
        if reference is None:
            reference = ranked
        same = float(np.mean([list(a) == list(b) for a, b in zip(ranked, reference, strict=True)]))
        overlap = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ranked, reference, strict=True)]))
        top1 = float(np.mean(ranked[:, 0] == reference[:, 0]))
        print(f"| {backend.name} | {metrics['recall@10']:.4f} | {metrics['mrr@10']:.4f} | {metrics['ndcg@10']:.4f} | "
              f"{same:.1%} | {overlap:.1%} | {top1:.1%} |")
        results.append({"backend": backend.name, **metrics, "identical_top10": same, "top10_overlap": overlap,
                        "same_top1": top1})
    return results


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-encoder-") as tmp:
        split = bq_split() if BQ_FILE.exists() else None
        if args.random_bge_large:
            print(f"building a random-weight BERT with bge-large-zh-v1.5's configuration in {tmp} ...", flush=True)
            model_ref = str(build_random_bge_large(Path(tmp)))
        elif args.model == "minilm-zh":
            if split is None:
                print("no ../shared/data/bq: using the packaged MiniLM stand-in, not the vocabulary-extended one")
                model_ref = STAND_IN_MODEL
            else:
                started = time.perf_counter()
                model_ref = str(extended_minilm(Path(tmp) / "minilm-zh", split))
                print(f"vocabulary-extended MiniLM built in {time.perf_counter() - started:.1f} s", flush=True)
        else:
            model_ref = args.model
        return measure(args, model_ref, locate_model(model_ref), split)


def measure(args: argparse.Namespace, model_ref: str, model_dir: Path, split: Any) -> dict[str, object]:
    setup = Setup(args, model_ref, model_dir)
    try:
        return measure_with(setup, args, split)
    finally:
        setup.close()


def measure_with(setup: Setup, args: argparse.Namespace, split: Any) -> dict[str, object]:
    manifest, ours = setup.manifest, setup.torch
    if args.texts == "bq" and BQ_FILE.exists():
        texts, source = bq_texts(args.max_texts)
    else:
        texts, source = passage_texts(args.max_texts)
    lengths = ours.count_tokens(texts)
    import onnxruntime
    import sentence_transformers
    import transformers

    print(f"\nmodel {manifest.name} ({manifest.version}) · pooling {manifest.pooling} · dim {manifest.dimension} · "
          f"max tokens {ours.max_tokens} · device {setup.device} · batch size {args.batch_size}")
    print(f"torch {torch.__version__} · onnxruntime {onnxruntime.__version__} · transformers "
          f"{transformers.__version__} · sentence-transformers {sentence_transformers.__version__}")
    if setup.st is not None:
        print(f"ST modules: {' -> '.join(type(m).__name__ + describe_pooling(m) for m in setup.st)}")
    for name, seconds in setup.export_s.items():
        print(f"{name} graph: {setup.onnx_paths[name].parent.name} (export or cache load {seconds:.1f} s)")
    print(f"texts: {len(texts)} ({source}); tokens per text median {statistics.median(lengths):.0f}, "
          f"max {max(lengths)}, {sum(n > ours.max_tokens for n in lengths)} truncated at {ours.max_tokens}")
    summary: dict[str, Any] = {"model": manifest.version, "device": str(setup.device), "texts": len(texts),
                               "source": source, "batch_size": args.batch_size, "runs": []}
    shapes = batch_shapes(ours, texts)
    gflop = forward_gflop(ours.model.config, shapes)
    print(f"one pass: {len(shapes)} batches, {sum(b * n for b, n in shapes)} tokens with padding, "
          f"{gflop:.1f} GFLOP of matrix products")
    summary["gflop_per_pass"] = gflop
    for threads in args.threads:
        backends = measure_threads(setup, threads, texts)
        peak = gemm_peak(threads) if setup.device.type == "cpu" else None
        summary["runs"] += print_table(backends, len(texts), threads, gflop, peak)
    if split is not None and not args.random_bge_large:
        summary["bq"] = bq_recall(setup, split)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-zh",
                        help="minilm-zh (vocabulary-extended MiniLM, built here; default), a hub id or a directory")
    parser.add_argument("--backends", default="torch,onnx,onnx-int8,st",
                        help="comma-separated, the first is the baseline: torch, onnx, onnx-int8, "
                             "st (sentence-transformers), infinity-optimum (infinity-emb's ONNX engine over "
                             "HTTP; needs bash bench/setup_infinity_optimum.sh)")
    parser.add_argument("--infinity-venv", type=Path, default=REPO_ROOT / ".venv-infinity-optimum",
                        help="virtualenv with infinity-emb[optimum] (for the infinity-optimum backend)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--texts", default="bq", choices=["bq", "passages"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100, help="single-query latency samples per backend")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts; 0 = the libraries' default")
    parser.add_argument("--onnx-cache-dir", type=Path, default=None)
    parser.add_argument("--random-bge-large", action="store_true",
                        help="random weights in bge-large-zh-v1.5's exact shape (for GPU runs; small on CPU)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.threads = [int(t) for t in args.threads.split(",")]
    unknown = set(args.backends) - {"torch", "onnx", "onnx-int8", "st", "infinity-optimum"}
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda but torch sees no GPU")
        if {"onnx", "onnx-int8"} & set(args.backends):
            parser.error("the ONNX backends run on CPU only (the GPU path stays PyTorch)")
    print(f"bench_encoder · {platform.node()} · {os.cpu_count()} CPUs · "
          f"{platform.processor() or platform.machine()} · Python {platform.python_version()}"
          + (f" · {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    started = time.perf_counter()
    if hasattr(os, "getloadavg"):
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
    summary = run(args)
    if hasattr(os, "getloadavg"):
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
