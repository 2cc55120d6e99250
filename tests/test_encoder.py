"""The in-process encoder: instruction handling, pooling, batching order, truncation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semsearch.encoders import TorchEncoder
from semsearch.manifest import BGE_ZH_INSTRUCTION


def test_instruction_is_applied_to_queries_exactly_once_and_never_to_documents(tiny_encoder: TorchEncoder) -> None:
    tokenizer = tiny_encoder.tokenizer
    query = "如何申请退款？"
    seen: list[list[int]] = []
    original = tiny_encoder.tokenize

    def recording(texts):  # type: ignore[no-untyped-def]
        features = original(texts)
        seen.extend(row[row != tokenizer.pad_token_id].tolist() for row in features["input_ids"])
        return features

    tiny_encoder.tokenize = recording  # type: ignore[method-assign]
    try:
        tiny_encoder.encode_queries([query])
        tiny_encoder.encode_documents([query])
    finally:
        del tiny_encoder.tokenize
    instruction_ids = tokenizer(BGE_ZH_INSTRUCTION, add_special_tokens=False)["input_ids"]
    query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert seen[0] == [cls, *instruction_ids, *query_ids, sep]
    assert seen[1] == [cls, *query_ids, sep]
    assert tokenizer.unk_token_id not in instruction_ids  # the instruction is really in the vocabulary


def test_query_and_document_vectors_differ_only_by_instruction(tiny_encoder: TorchEncoder) -> None:
    query = "退钱怎么操作？"
    as_query = tiny_encoder.encode_queries([query])[0]
    as_document_with_prefix = tiny_encoder.encode_documents([BGE_ZH_INSTRUCTION + query])[0]
    as_document = tiny_encoder.encode_documents([query])[0]
    np.testing.assert_allclose(as_query, as_document_with_prefix, atol=1e-6)
    assert not np.allclose(as_query, as_document, atol=1e-3)


def _hidden_states(encoder: TorchEncoder, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    features = encoder.tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.model(**features).last_hidden_state[0]
    return hidden, features["attention_mask"][0]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_matches_hand_computation(tiny_encoder: TorchEncoder, pooling: str) -> None:
    text = "手机开不了机"
    encoder = TorchEncoder(
        Path(tiny_encoder.manifest.model_path),
        tiny_encoder.manifest.model_copy(update={"pooling": pooling}), device="cpu",
    )
    hidden, _ = _hidden_states(encoder, text)
    expected = hidden[0] if pooling == "cls" else hidden.mean(dim=0)  # one text: no padding
    expected = (expected / expected.norm()).numpy()
    np.testing.assert_allclose(encoder.encode_documents([text])[0], expected, atol=1e-5)


def test_cls_and_mean_pooling_give_different_vectors(tiny_encoder: TorchEncoder) -> None:
    mean = TorchEncoder(
        Path(tiny_encoder.manifest.model_path),
        tiny_encoder.manifest.model_copy(update={"pooling": "mean"}), device="cpu",
    )
    text = "快递包裹几天没动静"
    assert not np.allclose(tiny_encoder.encode_documents([text]), mean.encode_documents([text]), atol=1e-3)


def test_length_sorted_batches_restore_input_order(tiny_encoder: TorchEncoder) -> None:
    texts = ["好", "如何申请退款？请在订单页面点击申请退款", "快递", "手机开不了机怎么办", "密码忘记了"] * 3
    together = tiny_encoder.encode_documents(texts)  # batch size 8: several batches, padded
    one_by_one = np.stack([tiny_encoder.encode_documents([t])[0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_output_is_float32_and_l2_normalized(tiny_encoder: TorchEncoder) -> None:
    vectors = tiny_encoder.encode_queries(["退款", "发票"])
    assert vectors.dtype == np.float32
    assert vectors.shape == (2, tiny_encoder.manifest.dimension)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert tiny_encoder.encode_queries([]).shape == (0, tiny_encoder.manifest.dimension)


def test_long_text_is_truncated_at_the_model_limit(tiny_encoder: TorchEncoder) -> None:
    limit = tiny_encoder.max_tokens
    long_text = "退款" * limit  # far over the limit
    assert tiny_encoder.count_tokens([long_text])[0] > limit
    features = tiny_encoder.tokenize([long_text])
    assert features["input_ids"].shape[1] == limit
    truncated = tiny_encoder.tokenizer.decode(features["input_ids"][0][1:-1]).replace(" ", "")
    np.testing.assert_allclose(
        tiny_encoder.encode_documents([long_text]), tiny_encoder.encode_documents([truncated]), atol=1e-5
    )


def test_minilm_real_weights_rank_a_paraphrase_first(minilm_encoder: TorchEncoder) -> None:
    documents = ["How can I get my money back for an order?", "The parcel has not moved for days",
                 "My phone will not turn on"]
    query = minilm_encoder.encode_queries(["refund request"])[0]
    scores = minilm_encoder.encode_documents(documents) @ query
    assert int(np.argmax(scores)) == 0
    assert minilm_encoder.manifest.pooling == "mean" and minilm_encoder.manifest.dimension == 384
