"""A tiny random-weight Chinese BERT, built in the test session: real code paths, no download."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from semsearch.manifest import BGE_ZH_INSTRUCTION, ModelManifest

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Characters of the instruction, the FAQ domain and the tests' texts; ASCII letters and digits.
CHINESE = sorted(set(
    BGE_ZH_INSTRUCTION
    + "如何申请退款退钱怎么操作快递包裹物流运输中几天没动静手机开不了机电池发热密码忘记登录找回账号注册"
    + "发票抬头写错能改吗保修期是多久维修更换会员积分等级支付失败重复扣款优惠券订单地址修改取消"
    + "我的你他们这个那在有没了是不吗呢吧啊好很大小多少一二三四五六七八九十天月日年时分钟工作"
    + "文本查询问题答案客服产品商品价格钱元请点击页面进入选择提交审核处理完成成功后前内外上下"
    + "。，！？；：、“”（）…"
))
ASCII = list("abcdefghijklmnopqrstuvwxyz0123456789") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]


def build_tiny_bert(out_dir: Path, *, seed: int = 0, pooling: str = "cls", version: str | None = None,
                    hidden: int = 32, max_tokens: int = 128) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + CHINESE + ASCII
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), do_lower_case=True,
                                  tokenize_chinese_chars=True, model_max_length=max_tokens)
    tokenizer.save_pretrained(str(out_dir))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=hidden * 2, max_position_embeddings=max_tokens)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(out_dir))
    ModelManifest(
        name="tiny-zh-bert", version=version or f"tiny-zh-bert-seed{seed}-{pooling}", pooling=pooling,  # type: ignore[arg-type]
        normalize=True, query_instruction=BGE_ZH_INSTRUCTION, dimension=hidden, max_tokens=max_tokens,
    ).save(out_dir)
    return out_dir


def build_tiny_cross_encoder(out_dir: Path, *, seed: int = 0, hidden: int = 32, max_tokens: int = 128,
                             layers: int = 2, intermediate: int | None = None, heads: int = 2,
                             initializer_range: float = 0.02) -> Path:
    """A random-weight BertForSequenceClassification (num_labels=1, a relevance logit) with the tiny
    Chinese vocabulary: a real cross-encoder code path (in-process and behind infinity), no download.
    A larger `initializer_range` spreads its scores (the default gives nearly equal logits)."""
    from transformers import BertForSequenceClassification

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + CHINESE + ASCII
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), do_lower_case=True,
                                  tokenize_chinese_chars=True, model_max_length=max_tokens)
    tokenizer.save_pretrained(str(out_dir))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate or hidden * 2,
                        max_position_embeddings=max_tokens, num_labels=1, initializer_range=initializer_range)
    BertForSequenceClassification(config).save_pretrained(str(out_dir))
    return out_dir
