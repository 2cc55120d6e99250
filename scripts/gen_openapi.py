"""Write service/openapi.json, the HTTP/JSON gateway's OpenAPI document generated from the proto
descriptors and the .proto comments (committed, served at GET /openapi.json; a test checks it is
current). Run after scripts/gen_proto.py."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.openapi import proto_comments, render  # noqa: E402

if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "service" / "openapi.json"
    target.write_text(render(proto_comments()), encoding="utf-8")
    print(f"wrote {target}")
