"""Our TorchEncoder's document throughput over sentence-transformers' `encode`, same model and texts.

Both encode the same texts with the same batch size, device, dtype and token limit; each is warmed
up, then timed alternately (ours, ST, ours, ST, ...) so that load from other processes hits both
alike. Prints median texts/s of each, the ratio ours/ST (target >= 1.0x), whether the vectors agree
(cosine > 0.999 per text) and our single-query latency (p50 over 50 calls).

Texts: the shipped FAQ corpus plus the CMRC2018 passages from ../shared/data/cmrc2018 (next to the
repository) when present; otherwise the FAQ texts alone.

    .venv/bin/python bench/bench_encoder.py                      # MiniLM stand-in on CPU
    python bench/bench_encoder.py --device cuda --random-bge-large --max-texts 2048 --batch-size 64

`--random-bge-large` builds, in a temporary directory, a BERT with bge-large-zh-v1.5's exact shape
(24 layers, hidden 1024, 16 heads, intermediate 4096, vocab 21128, 512 positions) and random
weights, a character-level Chinese tokenizer, a semsearch manifest (CLS pooling, BGE instruction)
and a sentence-transformers config with CLS pooling, so both libraries pool the same way. On
CUDA both run in float16 (ours by default; ST through `.half()` after loading).
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
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from semsearch.encoders.local import STAND_IN_MODEL, TorchEncoder, locate_model  # noqa: E402
from semsearch.manifest import BGE_ZH_INSTRUCTION, ModelManifest, resolve_manifest  # noqa: E402

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


def load_texts(max_texts: int) -> tuple[list[str], str]:
    faq = faq_texts()
    cmrc = cmrc_passages(REPO_ROOT.parent / "shared" / "data")
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


# ----------------------------------------------------------------------------------------- measuring
def timed(fn: Callable[[], np.ndarray], device: torch.device) -> tuple[float, np.ndarray]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()  # both return host numpy arrays, so the work is done when they return
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


def run(args: argparse.Namespace) -> dict[str, object]:
    from sentence_transformers import SentenceTransformer

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.random_bge_large:
        tmp = tempfile.TemporaryDirectory(prefix="random-bge-large-")
        print(f"building a random-weight BERT with bge-large-zh-v1.5's configuration in {tmp.name} ...", flush=True)
        started = time.perf_counter()
        model_dir = build_random_bge_large(Path(tmp.name))
        print(f"  built in {time.perf_counter() - started:.1f} s", flush=True)
        model_ref = str(model_dir)
    else:
        model_ref = args.model
        model_dir = locate_model(model_ref)
    try:
        return measure(args, model_ref, model_dir, SentenceTransformer)
    finally:
        if tmp is not None:
            tmp.cleanup()


def measure(args: argparse.Namespace, model_ref: str, model_dir: Path, st_class: type) -> dict[str, object]:
    manifest = resolve_manifest(model_dir, model_ref)
    ours = TorchEncoder(model_dir, manifest, device=args.device, batch_size=args.batch_size)
    device = ours.device
    dtype = next(ours.model.parameters()).dtype
    st = st_class(str(model_dir), device=str(device))
    if dtype != torch.float32:
        st.half()  # same dtype as ours (float16 on CUDA)
    st.max_seq_length = ours.max_tokens
    st_pooling = [type(m).__name__ + describe_pooling(m) for m in st]
    texts, source = load_texts(args.max_texts)
    lengths = ours.count_tokens(texts)
    truncated = sum(n > ours.max_tokens for n in lengths)
    print(f"\nmodel {manifest.name} ({manifest.version}) · pooling {manifest.pooling} · dim {manifest.dimension} · "
          f"max tokens {ours.max_tokens}")
    print(f"ST modules: {' -> '.join(st_pooling)} · ST max_seq_length {st.max_seq_length}")
    import sentence_transformers
    import transformers

    print(f"device {device} · dtype ours {dtype}, ST {next(st.parameters()).dtype} · batch size {args.batch_size} · "
          f"torch threads {torch.get_num_threads()} · torch {torch.__version__} · transformers "
          f"{transformers.__version__} · sentence-transformers {sentence_transformers.__version__}")
    print(f"texts: {len(texts)} from {source}; tokens per text median {statistics.median(lengths):.0f}, "
          f"max {max(lengths)}, {truncated} truncated at {ours.max_tokens}")

    def run_ours() -> np.ndarray:
        return ours.encode_documents(texts)

    def run_st() -> np.ndarray:
        return st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False)

    # Warm-up on the longest texts as well as short ones. On CUDA, each new (batch, length) shape pays once
    # for allocator growth and kernel selection: a first pass over all the texts ran 2.5x slower than the
    # next (H100), so there both libraries make one full untimed pass first, lest it land in one side's timing.
    by_length = sorted(texts, key=len, reverse=True)
    warm_sets = [by_length[: args.batch_size], by_length[len(by_length) // 2 :][: args.batch_size],
                 by_length[-args.batch_size :]]
    if device.type == "cuda":
        warm_sets.append(texts)
    for warm in warm_sets:
        ours.encode_documents(warm)
        st.encode(warm, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)

    ours_s: list[float] = []
    st_s: list[float] = []
    ours_vec = st_vec = None
    for rep in range(args.repeats):
        # Alternate the order too, so neither always runs right after the other.
        order = [("ours", run_ours), ("st", run_st)] if rep % 2 == 0 else [("st", run_st), ("ours", run_ours)]
        for name, fn in order:
            seconds, vectors = timed(fn, device)
            if name == "ours":
                ours_s.append(seconds)
                ours_vec = vectors
            else:
                st_s.append(seconds)
                st_vec = vectors
        print(f"  repetition {rep + 1}/{args.repeats}: ours {len(texts) / ours_s[-1]:8.1f} texts/s, "
              f"ST {len(texts) / st_s[-1]:8.1f} texts/s", flush=True)
    assert ours_vec is not None and st_vec is not None
    cosine = np.sum(ours_vec * st_vec, axis=1) / (
        np.linalg.norm(ours_vec, axis=1) * np.linalg.norm(st_vec, axis=1))
    agree = bool(np.all(cosine > 0.999))

    ours_tps = len(texts) / statistics.median(ours_s)
    st_tps = len(texts) / statistics.median(st_s)
    paired = [s / o for o, s in zip(ours_s, st_s, strict=True)]  # per repetition: ST time / our time

    # Single short queries, one at a time (what the service does at low load).
    # Every query shape is warmed for both first; then each query is timed on both, alternating which goes first.
    for _ in range(2):
        for q in SHORT_QUERIES:
            ours.encode_queries([q])
            st.encode([manifest.apply_query_instruction(q)], normalize_embeddings=True, show_progress_bar=False)
    query_ms: list[float] = []
    st_query_ms: list[float] = []
    for i in range(args.queries):
        q = SHORT_QUERIES[i % len(SHORT_QUERIES)]
        ours_call = functools.partial(ours.encode_queries, [q])
        st_call = functools.partial(st.encode, [manifest.apply_query_instruction(q)], normalize_embeddings=True,
                                    show_progress_bar=False)
        if i % 2 == 0:
            query_ms.append(timed(ours_call, device)[0] * 1e3)
            st_query_ms.append(timed(st_call, device)[0] * 1e3)
        else:
            st_query_ms.append(timed(st_call, device)[0] * 1e3)
            query_ms.append(timed(ours_call, device)[0] * 1e3)

    print(f"\n| encoder | texts/s (median of {args.repeats}) | min s | median s | max s |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in (("semsearch TorchEncoder.encode_documents", ours_s),
                       ("sentence-transformers encode", st_s)):
        print(f"| {name} | {len(texts) / statistics.median(runs):.1f} | {min(runs):.3f} | "
              f"{statistics.median(runs):.3f} | {max(runs):.3f} |")
    verdict = "meets" if ours_tps / st_tps >= 1.0 else "BELOW"
    print(f"\nratio ours/ST (median texts/s): {ours_tps / st_tps:.3f}x ({verdict} the >= 1.0x target); "
          f"per-repetition ratios {', '.join(f'{r:.3f}' for r in paired)} (median {statistics.median(paired):.3f})")
    print(f"vectors agree: cosine min {cosine.min():.6f}, median {np.median(cosine):.6f} over {len(texts)} texts "
          f"-> {'OK' if agree else 'MISMATCH'} (threshold 0.999)")
    print(f"single short query latency, {args.queries} calls: ours p50 {statistics.median(query_ms):.2f} ms, "
          f"p99 {percentile(query_ms, 99):.2f} ms; ST p50 {statistics.median(st_query_ms):.2f} ms, "
          f"p99 {percentile(st_query_ms, 99):.2f} ms")
    ours.close()
    return {
        "model": manifest.version, "device": str(device), "dtype": str(dtype), "batch_size": args.batch_size,
        "texts": len(texts), "source": source, "ours_texts_per_s": ours_tps, "st_texts_per_s": st_tps,
        "ratio": ours_tps / st_tps, "paired_ratios": paired, "cosine_min": float(cosine.min()), "agree": agree,
        "query_p50_ms": statistics.median(query_ms), "st_query_p50_ms": statistics.median(st_query_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=STAND_IN_MODEL, help="hub id or local directory (default: MiniLM stand-in)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-texts", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", type=int, default=50, help="single-query latency samples")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--random-bge-large", action="store_true",
                        help="random weights in bge-large-zh-v1.5's exact shape (for GPU runs; small on CPU)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    print(f"bench_encoder · {platform.node()} · {os.cpu_count()} CPUs · "
          f"{platform.processor() or platform.machine()} · Python {platform.python_version()}"
          + (f" · {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    if hasattr(os, "getloadavg"):
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
    summary = run(args)
    if hasattr(os, "getloadavg"):
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
