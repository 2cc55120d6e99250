"""Chunking long documents on Chinese sentence boundaries."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semsearch.chunking import Chunker, content_hash, reassemble, split_sentences, split_sentences_legacy
from semsearch.encoders import TorchEncoder


def test_sentences_split_after_chinese_punctuation_and_rejoin() -> None:
    text = "如何退款？点击申请。三天内处理！注意；谢谢…\n好"
    assert split_sentences(text) == ["如何退款？", "点击申请。", "三天内处理！", "注意；", "谢谢…", "\n", "好"]
    assert "".join(split_sentences(text)) == text


def test_short_text_is_one_chunk(tiny_encoder: TorchEncoder) -> None:
    chunker = Chunker(tiny_encoder.count_tokens, 64)
    assert [(c.index, c.text, c.start) for c in chunker.chunk("如何申请退款？")] == [(0, "如何申请退款？", 0)]


def test_chunks_fit_the_limit_end_on_sentence_boundaries_and_overlap(tiny_encoder: TorchEncoder) -> None:
    sentences = ["如何申请退款？", "请在订单页面点击申请退款。", "我们会在三个工作日内处理！", "客服电话请查看页面。"]
    text = "".join(sentences * 5)
    chunker = Chunker(tiny_encoder.count_tokens, 48, overlap_tokens=16)
    chunks = chunker.chunk(text)
    assert len(chunks) > 2
    for chunk in chunks:
        assert tiny_encoder.count_tokens([chunk.text])[0] <= 48
        assert chunk.text[-1] in "？。！"  # whole sentences only
        assert text[chunk.start : chunk.start + len(chunk.text)] == chunk.text
    for before, after in itertools.pairwise(chunks):
        assert after.start < before.start + len(before.text)  # overlap
    assert reassemble([(c.start, c.text) for c in chunks]) == text


def test_sentence_longer_than_the_limit_is_cut(tiny_encoder: TorchEncoder) -> None:
    text = "退" * 300
    chunks = Chunker(tiny_encoder.count_tokens, 40).chunk(text)
    assert all(tiny_encoder.count_tokens([c.text])[0] <= 40 for c in chunks)
    assert reassemble([(c.start, c.text) for c in chunks]) == text


def test_bad_chunker_settings_are_refused(tiny_encoder: TorchEncoder) -> None:
    with pytest.raises(ValueError):
        Chunker(tiny_encoder.count_tokens, 4)
    with pytest.raises(ValueError):
        Chunker(tiny_encoder.count_tokens, 64, overlap_tokens=60)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["退款", "快递。", "手机！", "发票？", "好", "\n", "abc ", "；"]), max_size=80))
def test_reassembly_is_lossless(tiny_encoder: TorchEncoder, pieces: list[str]) -> None:
    text = "".join(pieces) or "空"
    chunks = Chunker(tiny_encoder.count_tokens, 24, overlap_tokens=6).chunk(text)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert reassemble([(c.start, c.text) for c in chunks]) == text


def test_content_hash_depends_on_text_and_metadata() -> None:
    assert content_hash("a", {"x": 1}) == content_hash("a", {"x": 1})
    assert content_hash("a", {"x": 1}) != content_hash("a", {"x": 2})
    assert content_hash("a") != content_hash("b")
    # The same metadata through the API (protobuf doubles) and from a JSONL file (integers).
    assert content_hash("a", {"x": 1.0, "y": [2.0, {"z": 3}]}) == content_hash("a", {"x": 1, "y": [2, {"z": 3.0}]})
    assert content_hash("a", {"x": 1.5}) != content_hash("a", {"x": 1})


@pytest.mark.parametrize(("text", "sentences"), [
    ("他说：“可以退款。”然后…", ["他说：“可以退款。”", "然后…"]),  # the closing quote stays
    ("等等……好吧？！真的吗", ["等等……", "好吧？！", "真的吗"]),  # runs of end punctuation: one boundary
    ("（已退款。）下一句", ["（已退款。）", "下一句"]),
    ("《说明》到此为止。』」再见", ["《说明》到此为止。』」", "再见"]),
    ('He said "yes!" then left.', ['He said "yes!"', " then left."]),
    ("第一行\n第二行。", ["第一行\n", "第二行。"]),
    ("没有标点", ["没有标点"]),
])
def test_closers_stay_with_their_sentence_and_runs_are_one_boundary(text: str, sentences: list[str]) -> None:
    assert split_sentences(text) == sentences
    assert "".join(sentences) == text


def test_legacy_splitting_is_kept_for_old_collections() -> None:
    # Text-rules version 1: collections chunked before the fix keep chunking as they did.
    assert split_sentences_legacy("他说：“可以退款。”然后") == ["他说：“可以退款。", "”然后"]
    assert split_sentences_legacy("好吧？！") == ["好吧？", "！"]


def test_chunks_never_start_with_a_closing_quote(tiny_encoder: TorchEncoder) -> None:
    text = "他说：“可以退款。”然后我们处理了订单……好吧？！" * 12
    chunks = Chunker(tiny_encoder.count_tokens, 40).chunk(text)
    assert len(chunks) > 2
    for chunk in chunks:
        assert chunk.text[0] not in "”？！…", chunk.text
    assert reassemble([(c.start, c.text) for c in chunks]) == text


@settings(max_examples=60, deadline=None)
@given(st.text(st.sampled_from("退款。！？…”」）\n a"), max_size=60))
def test_sentences_rejoin_losslessly(text: str) -> None:
    pieces = split_sentences(text)
    assert "".join(pieces) == text and all(pieces)
