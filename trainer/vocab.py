"""`extend-vocab`: add the training corpus's unknown characters to a WordPiece (BERT) model.

An English vocabulary (all-MiniLM-L6-v2) maps most Chinese characters to [UNK], so every Chinese
question looks alike and no fine-tune can separate them. Each unknown character that occurs at least
`min_count` times becomes a real vocabulary entry with a new embedding row. New rows are random draws
with the per-dimension mean and spread of the existing rows: distinct from each other (so character
overlap alone already carries signal) and on the scale the encoder expects; training then moves them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from semsearch.encoders.local import locate_model
from semsearch.errors import InvalidInputError
from semsearch.manifest import resolve_manifest, weights_hash

log = structlog.get_logger(__name__)


INIT_MODES = ("random", "cjk")


@dataclass
class VocabResult:
    out_dir: Path
    added: list[str]
    stats: dict[str, Any]


def _is_cjk(char: str) -> bool:
    # BERT's basic tokenizer isolates these code points as their own words.
    cp = ord(char)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _is_isolated(tokenizer: PreTrainedTokenizerBase, char: str) -> bool:
    """Whether the pre-tokenizer splits `char` off as its own word (CJK, punctuation)."""
    if _is_cjk(char):
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return False
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(f"a{char}a")]
    return len(words) == 3


def unk_rate(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> float:
    unk = tokenizer.unk_token_id
    total = hits = 0
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        total += len(ids)
        hits += sum(1 for i in ids if i == unk)
    return hits / total if total else 0.0


def unknown_characters(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    *,
    min_count: int = 1,
) -> Counter[str]:
    """Characters (as the tokenizer normalizes them) that tokenize to [UNK], with their counts."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = backend.normalizer if backend is not None else None
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = normalizer.normalize_str(text) if normalizer is not None else text
        counts.update(ch for ch in normalized if not ch.isspace() and unicodedata.category(ch)[0] != "C")
    unk = tokenizer.unk_token
    return Counter({ch: n for ch, n in counts.items() if n >= min_count and tokenizer.tokenize(ch) == [unk]})


def _wordpiece_tokenizer(model_dir: Path, model_ref: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if (
        not (model_dir / "vocab.txt").exists()
        or not getattr(tokenizer, "is_fast", False)
        or "WordPiece" not in str(type(tokenizer.backend_tokenizer.model))
    ):
        raise InvalidInputError(f"{model_ref}: only WordPiece (BERT-style) tokenizers with vocab.txt can be extended")
    return tokenizer


def _new_tokens(tokenizer: Any, chars: list[str], existing: set[str]) -> list[str]:
    """The vocabulary entries `chars` need, in order, skipping those already there."""
    new_tokens: list[str] = []
    for ch in chars:
        # A character that is not split off as its own word also needs a continuation piece.
        for token in (ch,) if _is_isolated(tokenizer, ch) else (ch, "##" + ch):
            if token not in existing:
                new_tokens.append(token)
                existing.add(token)
    return new_tokens


def _init_new_rows(model: Any, tokenizer: Any, old_size: int, *, init: str, seed: int) -> None:
    """New embedding rows drawn around the mean/spread of the reference rows (see `init`)."""
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        reference = weight[:old_size]
        if init == "cjk":
            cjk_rows = [i for token, i in tokenizer.get_vocab().items() if len(token) == 1 and _is_cjk(token)]
            if len(cjk_rows) >= 16:
                reference = weight[sorted(cjk_rows)]
        generator = torch.Generator().manual_seed(seed)
        fresh = torch.randn((weight.shape[0] - old_size, weight.shape[1]), generator=generator)
        weight[old_size:] = reference.mean(dim=0) + fresh * reference.std(dim=0)


def extend_vocabulary(
    model_ref: str,
    texts: Iterable[str],
    out_dir: Path,
    *,
    min_count: int = 1,
    max_new: int | None = None,
    always: str = "",
    seed: int = 0,
    name: str | None = None,
    query_instruction: str | None = None,
    init: str = "random",
) -> VocabResult:
    """Write to `out_dir` the model with its vocabulary extended, its tokenizer and a manifest.

    `always`: text whose unknown characters are added whatever their count (the query instruction).
    `init`: new rows drawn around the mean/spread of all existing rows (`random`) or of the existing
    single CJK-character rows (`cjk`: where the model keeps the Chinese it knows; falls back to all
    rows when it knows fewer than 16)."""
    if init not in INIT_MODES:
        raise InvalidInputError(f"init must be one of {', '.join(INIT_MODES)}, got {init!r}")
    texts = list(texts)
    model_dir = locate_model(model_ref)
    parent = resolve_manifest(model_dir, model_ref)
    tokenizer = _wordpiece_tokenizer(model_dir, model_ref)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidInputError(f"output directory {out_dir} is not empty")

    counts = unknown_characters(tokenizer, texts, min_count=min_count)
    forced = unknown_characters(tokenizer, [always]) if always else Counter()
    ranked = [ch for ch, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    if max_new is not None:
        ranked = ranked[:max_new]
    chars = list(dict.fromkeys([*forced, *ranked]))
    old_vocab = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    new_tokens = _new_tokens(tokenizer, chars, set(old_vocab))

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "tokenizer.json").unlink(missing_ok=True)  # rebuilt below from the new vocab.txt
    (out_dir / "vocab.txt").write_text("\n".join(old_vocab + new_tokens) + "\n", encoding="utf-8")
    new_tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    new_tokenizer.save_pretrained(str(out_dir))
    unk = new_tokenizer.unk_token
    still_unknown = [ch for ch in chars if new_tokenizer.tokenize(ch) == [unk]]
    if still_unknown:
        raise RuntimeError(f"characters still unknown after extension: {''.join(still_unknown[:20])}")

    model = AutoModel.from_pretrained(str(model_dir))
    old_size = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(new_tokenizer))
    _init_new_rows(model, tokenizer, old_size, init=init, seed=seed)
    model.save_pretrained(str(out_dir))

    added_hash = hashlib.sha256("".join(new_tokens).encode("utf-8")).hexdigest()[:16]
    stats = {
        "added_tokens": len(new_tokens),
        "added_characters": len(chars),
        "old_vocab": old_size,
        "new_vocab": len(new_tokenizer),
        "min_count": min_count,
        "init": init,
        "unk_rate_before": round(unk_rate(tokenizer, texts), 4),
        "unk_rate_after": round(unk_rate(new_tokenizer, texts), 4),
    }
    manifest_name = name or f"{parent.name}-vocab{len(chars)}"
    parent.model_copy(update={
        "name": manifest_name,
        "version": f"{manifest_name}-{weights_hash(out_dir)}",
        "model_path": "",
        "query_instruction": parent.query_instruction if query_instruction is None else query_instruction,
        "parent_model": parent.version,
        "data_hash": added_hash,
        "metrics": {"vocab": stats},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }).save(out_dir)
    log.info("vocabulary_extended", out=str(out_dir), **stats)
    return VocabResult(out_dir, new_tokens, stats)


