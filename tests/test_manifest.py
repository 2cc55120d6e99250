"""Model manifests: where pooling, instruction and version come from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from semsearch.encoders import locate_model, stand_in_model_path
from semsearch.errors import ModelNotFoundError
from semsearch.manifest import BGE_ZH_INSTRUCTION, KNOWN_PROFILES, MANIFEST_FILENAME, resolve_manifest
from tests.tinymodel import build_tiny_bert


def test_known_bge_profiles_use_cls_pooling_and_the_instruction() -> None:
    for name in ("bge-large-zh-v1.5", "bge-base-zh-v1.5", "bge-small-zh-v1.5"):
        profile = KNOWN_PROFILES[name]
        assert profile["pooling"] == "cls"
        assert profile["query_instruction"] == BGE_ZH_INSTRUCTION
        assert profile["max_tokens"] == 512
    assert KNOWN_PROFILES["bge-large-zh-v1.5"]["dimension"] == 1024


def test_manifest_file_beside_the_model_wins_over_the_name(tmp_path: Path) -> None:
    model_dir = build_tiny_bert(tmp_path / "bge-large-zh-v1.5", pooling="mean", version="fine-tuned-7")
    manifest = resolve_manifest(model_dir, "BAAI/bge-large-zh-v1.5")
    assert (manifest.pooling, manifest.version, manifest.dimension) == ("mean", "fine-tuned-7", 32)


def test_profile_by_hub_name_when_no_manifest_file(tmp_path: Path) -> None:
    model_dir = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(stand_in_model_path(), model_dir)
    manifest = resolve_manifest(model_dir, "sentence-transformers/all-MiniLM-L6-v2")
    assert manifest.pooling == "mean" and manifest.query_instruction == "" and manifest.dimension == 384
    assert manifest.version.startswith("all-MiniLM-L6-v2-")


def test_version_changes_with_the_weights(tmp_path: Path) -> None:
    first = build_tiny_bert(tmp_path / "a", seed=1)
    second = build_tiny_bert(tmp_path / "b", seed=2)
    for model_dir in (first, second):
        (model_dir / MANIFEST_FILENAME).unlink()
        (model_dir / "1_Pooling").mkdir()
        (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    one, two = resolve_manifest(first, "custom"), resolve_manifest(second, "custom")
    assert one.pooling == two.pooling == "cls"
    assert one.version != two.version


def test_unknown_model_without_manifest_or_pooling_is_refused(tmp_path: Path) -> None:
    model_dir = build_tiny_bert(tmp_path / "mystery")
    (model_dir / MANIFEST_FILENAME).unlink()
    with pytest.raises(ModelNotFoundError, match="pooling"):
        resolve_manifest(model_dir, "mystery")
    assert resolve_manifest(model_dir, "mystery", {"pooling": "cls"}).pooling == "cls"


def test_locate_model_paths_and_hub_ids(tmp_path: Path) -> None:
    assert locate_model(str(stand_in_model_path())) == stand_in_model_path().resolve()
    assert locate_model("sentence-transformers/all-MiniLM-L6-v2") == stand_in_model_path()
    with pytest.raises(ModelNotFoundError, match="not found"):
        locate_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        locate_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="hub"):
        locate_model("BAAI/bge-large-zh-v1.5")  # not cached, hub unreachable here
