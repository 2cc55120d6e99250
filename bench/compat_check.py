"""Compatibility probe: pymilvus MilvusClient against Milvus Lite vs a real Milvus server.

Usage:
    .venv/bin/python bench/compat_check.py --backend lite
    .venv/bin/python bench/compat_check.py --backend server
    .venv/bin/python bench/compat_check.py --backend uri --uri http://127.0.0.1:PORT
    /tmp/lite25-venv/bin/python bench/compat_check.py --backend lite   # the engine of another venv

Prints one line per operation: OK / FAIL with the exact exception text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pymilvus import DataType, MilvusClient

DIM = 384
COL = "compat_docs"
RESULTS: list[tuple[str, str, str]] = []


def step(name):
    def deco(fn):
        def run(*a, **kw):
            try:
                out = fn(*a, **kw)
                RESULTS.append((name, "OK", "" if out is None else str(out)[:300]))
                print(f"OK   | {name}", file=sys.stderr, flush=True)
                return out
            except Exception as e:
                msg = f"{type(e).__name__}: {e}".replace("\n", " ")
                RESULTS.append((name, "FAIL", msg[:400]))
                print(f"FAIL | {name} | {msg[:200]}", file=sys.stderr, flush=True)
                if os.environ.get("COMPAT_TRACE"):
                    traceback.print_exc()
                return None
        return run
    return deco


def milvus_str(value: str) -> str:
    """Quote an arbitrary str as a filter string literal accepted by BOTH Milvus 2.3 and Lite 3.2.

    Lite's tokenizer only knows \\" \\' \\\\ \\n \\r \\t (no \\uXXXX), and both engines reject
    a raw CR/LF inside a literal, so escape exactly those; everything else (CJK, emoji) stays raw.
    """
    return '"' + (value.replace("\\", "\\\\").replace('"', '\\"')
                  .replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")) + '"'


def vecs(n, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def probe(c: MilvusClient):
    if c.has_collection(COL):
        c.drop_collection(COL)

    @step("create_collection(schema, description)")
    def create():
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False,
                                 description="semsearch test collection")
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("text", DataType.VARCHAR, max_length=65535)
        schema.add_field("metadata", DataType.JSON)
        c.create_collection(COL, schema=schema, consistency_level="Strong")
        return c.list_collections()
    create()

    @step("describe_collection -> description")
    def desc():
        d = c.describe_collection(COL)
        if d.get("description") != "semsearch test collection":
            raise AssertionError(f"description not round-tripped: {d.get('description')!r}")
        return {k: d.get(k) for k in ("description", "num_shards", "consistency_level")}
    desc()

    @step("alter_collection_properties + describe")
    def props():
        c.alter_collection_properties(COL, properties={"collection.ttl.seconds": 0,
                                                          "semsearch.model": "minilm"})
        d = c.describe_collection(COL)
        p = d.get("properties")
        if not p or "semsearch.model" not in p:
            raise AssertionError(f"properties not returned: {p!r}")
        return p
    props()

    @step("create_index HNSW COSINE")
    def index():
        ip = c.prepare_index_params()
        ip.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE",
                     params={"M": 16, "efConstruction": 200})
        c.create_index(COL, ip)
        return c.describe_index(COL, c.list_indexes(COL)[0])
    if index() is None:
        @step("create_index FLAT COSINE (fallback: HNSW refused)")
        def index_flat():
            ip = c.prepare_index_params()
            ip.add_index(field_name="vector", index_type="FLAT", metric_type="COSINE")
            c.create_index(COL, ip)
            return c.describe_index(COL, c.list_indexes(COL)[0])
        index_flat()

    @step("load_collection")
    def load():
        c.load_collection(COL)
        return c.get_load_state(COL)
    load()

    v = vecs(50)
    cats = ["refund", "shipping", "other"]
    tags = ["a", "b", "c"]
    rows = [{"id": f"doc-{i}", "vector": v[i].tolist(), "text": f"text {i}",
             "metadata": {"category": cats[i % 3], "price": i % 7, "tag": tags[i % 3]}}
            for i in range(50)]
    rows[0]["metadata"]["category"] = 'He said "hi" \\ 退款'
    rows[0]["text"] = 'quote " backslash \\ 中文'

    @step("insert 50")
    def ins():
        return c.insert(COL, rows)
    ins()

    @step("read-after-insert with consistency_level=Bounded (informational)")
    def bounded():
        return c.query(COL, filter="", output_fields=["count(*)"], consistency_level="Bounded")
    bounded()

    @step("upsert (doc-1 changed, doc-new added)")
    def ups():
        r1 = {**rows[1], "text": "upserted"}
        rn = {**rows[2], "id": "doc-new"}
        res = c.upsert(COL, [r1, rn])
        got = c.get(COL, ids=["doc-1"], output_fields=["text"])
        if not got or got[0]["text"] != "upserted":
            raise AssertionError(f"upsert not visible: {got}")
        return res
    ups()

    @step("delete(ids=[...])")
    def dele():
        res = c.delete(COL, ids=["doc-49", "doc-48"])
        got = c.get(COL, ids=["doc-49", "doc-48"])
        if got:
            raise AssertionError(f"deleted rows still visible: {got}")
        return res
    dele()

    @step("get(ids)")
    def get():
        g = c.get(COL, ids=["doc-3", "doc-4"], output_fields=["id", "text", "metadata"])
        if len(g) != 2:
            raise AssertionError(f"expected 2 rows got {len(g)}")
        return g[0]
    get()

    @step("query(filter=...)")
    def query():
        q = c.query(COL, filter='metadata["category"] == "refund"', output_fields=["id"], limit=100)
        return len(q)
    query()

    @step("query count(*)")
    def count():
        return c.query(COL, filter="", output_fields=["count(*)"])
    count()

    qv = [v[5].tolist()]

    @step('search filter metadata["category"]=="refund"')
    def s1():
        r = c.search(COL, data=qv, filter='metadata["category"] == "refund"', limit=5,
                     output_fields=["metadata"], search_params={"metric_type": "COSINE", "params": {"ef": 64}})
        assert all(h["entity"]["metadata"]["category"] == "refund" for h in r[0]), r
        return [h["id"] for h in r[0]]
    s1()

    @step('search filter metadata["price"] > 3')
    def s2():
        r = c.search(COL, data=qv, filter='metadata["price"] > 3', limit=5, output_fields=["metadata"])
        assert r[0] and all(h["entity"]["metadata"]["price"] > 3 for h in r[0]), r
        return [h["id"] for h in r[0]]
    s2()

    @step('search filter metadata["tag"] in ["a","b"]')
    def s3():
        r = c.search(COL, data=qv, filter='metadata["tag"] in ["a", "b"]', limit=5, output_fields=["metadata"])
        assert r[0] and all(h["entity"]["metadata"]["tag"] in ("a", "b") for h in r[0]), r
        return [h["id"] for h in r[0]]
    s3()

    @step("query filter_params {cat}")
    def fp1():
        q = c.query(COL, filter='metadata["category"] == {cat}', filter_params={"cat": "refund"},
                    output_fields=["id"], limit=100)
        if not q:
            raise AssertionError("filter_params query returned 0 rows")
        return len(q)
    fp1()

    @step("search filter_params {cat},{p}")
    def fp2():
        r = c.search(COL, data=qv, filter='metadata["category"] == {cat} and metadata["price"] > {p}',
                     filter_params={"cat": "refund", "p": 2}, limit=5, output_fields=["metadata"])
        assert r[0] and all(h["entity"]["metadata"]["category"] == "refund" and
                            h["entity"]["metadata"]["price"] > 2 for h in r[0]), r
        return len(r[0])
    fp2()

    tricky = 'He said "hi" \\ 退款'

    @step("filter_params with tricky string (quote, backslash, CJK)")
    def fp3():
        q = c.query(COL, filter='metadata["category"] == {cat}', filter_params={"cat": tricky},
                    output_fields=["id"], limit=10)
        if [r["id"] for r in q] != ["doc-0"]:
            raise AssertionError(f"got {q}")
        return q
    fp3()

    @step("literal escaped with json.dumps")
    def esc1():
        expr = f'metadata["category"] == {json.dumps(tricky, ensure_ascii=False)}'
        q = c.query(COL, filter=expr, output_fields=["id"], limit=10)
        if [r["id"] for r in q] != ["doc-0"]:
            raise AssertionError(f"expr={expr!r} got {q}")
        return expr
    esc1()

    @step("literal escaped with json.dumps(ensure_ascii=True) (\\uXXXX)")
    def esc2():
        expr = f'metadata["category"] == {json.dumps(tricky)}'
        q = c.query(COL, filter=expr, output_fields=["id"], limit=10)
        if [r["id"] for r in q] != ["doc-0"]:
            raise AssertionError(f"expr={expr!r} got {q}")
        return expr
    esc2()

    @step("literal escaped manually (\\\\ then \\\") on VARCHAR text field")
    def esc3():
        val = 'quote " backslash \\ 中文'
        lit = '"' + val.replace("\\", "\\\\").replace('"', '\\"') + '"'
        q = c.query(COL, filter=f"text == {lit}", output_fields=["id"], limit=10)
        if [r["id"] for r in q] != ["doc-0"]:
            raise AssertionError(f"lit={lit!r} got {q}")
        return lit
    esc3()

    @step("single-quoted literal with unescaped double quote")
    def esc4():
        val = 'He said "hi"'
        q = c.query(COL, filter=f"metadata[\"category\"] like '{val}%'", output_fields=["id"], limit=10)
        if [r["id"] for r in q] != ["doc-0"]:
            raise AssertionError(f"got {q}")
        return len(q)
    esc4()

    nasty = "it's \"x\" \\d\n\r\tnew 中文 😀 {cat} $1 % \x01 end"

    @step("nasty value: json.dumps(ensure_ascii=False) / (True) / milvus_str()")
    def esc5():
        c.upsert(COL, [{"id": "nasty", "vector": v[7].tolist(), "text": nasty,
                        "metadata": {"category": nasty}}])
        out = {}
        for label, lit in (("json_ea_false", json.dumps(nasty, ensure_ascii=False)),
                           ("json_ea_true", json.dumps(nasty, ensure_ascii=True)),
                           ("milvus_str", milvus_str(nasty))):
            try:
                q1 = c.query(COL, filter=f"text == {lit}", output_fields=["id"], limit=10)
                q2 = c.query(COL, filter=f'metadata["category"] == {lit}', output_fields=["id"], limit=10)
                ok = [r["id"] for r in q1] == ["nasty"] and [r["id"] for r in q2] == ["nasty"]
                out[label] = "match" if ok else f"nomatch {q1} {q2}"
            except Exception as e:
                out[label] = f"ERR {str(e)[:120]}"
        if out["milvus_str"] != "match":
            raise AssertionError(out)
        return out
    esc5()

    @step('workaround for `in`: (metadata["tag"] == "a" or metadata["tag"] == "b")')
    def s3b():
        r = c.search(COL, data=qv, filter='(metadata["tag"] == "a" or metadata["tag"] == "b")', limit=5,
                     output_fields=["metadata"])
        assert r[0] and all(h["entity"]["metadata"]["tag"] in ("a", "b") for h in r[0]), r
        return [h["id"] for h in r[0]]
    s3b()

    @step('json_contains_any / array_contains style: json_contains_any(metadata["tags"], ["a","b"])')
    def s3c():
        c.upsert(COL, [{"id": "arr", "vector": v[8].tolist(), "text": "arr",
                        "metadata": {"tags": ["a", "z"]}}])
        q = c.query(COL, filter='json_contains_any(metadata["tags"], ["a", "b"])', output_fields=["id"], limit=10)
        if [r["id"] for r in q] != ["arr"]:
            raise AssertionError(q)
        return q
    s3c()

    @step("create_alias")
    def al1():
        c.create_alias(COL, "compat_alias")
    al1()

    @step("describe_alias")
    def al2():
        return c.describe_alias("compat_alias")
    al2()

    @step("list_aliases")
    def al3():
        return c.list_aliases(COL)
    al3()

    @step("search via alias")
    def al4():
        r = c.search("compat_alias", data=qv, limit=3)
        return [h["id"] for h in r[0]]
    al4()

    @step("alter_alias -> second collection")
    def al5():
        if c.has_collection(COL + "_v2"):
            c.drop_collection(COL + "_v2")
        c.create_collection(COL + "_v2", dimension=DIM, id_type="string", max_length=512,
                            metric_type="COSINE", consistency_level="Strong")
        c.insert(COL + "_v2", [{"id": "v2-only", "vector": v[5].tolist()}])
        c.alter_alias(COL + "_v2", "compat_alias")
        r = c.search("compat_alias", data=qv, limit=3)
        ids = [h["id"] for h in r[0]]
        if ids != ["v2-only"]:
            raise AssertionError(f"alias still points to old collection? {ids}")
        return c.describe_alias("compat_alias")
    al5()

    @step("drop_alias + drop_collection")
    def drop():
        try:
            c.drop_alias("compat_alias")
        finally:
            c.drop_collection(COL)
            if c.has_collection(COL + "_v2"):
                c.drop_collection(COL + "_v2")
        return c.list_collections()
    drop()


FEAT = "compat_features"


def feature_schema(c: MilvusClient, analyzer: dict | None, partition_key: bool = True):
    from pymilvus import Function, FunctionType
    s = c.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    s.add_field("doc_id", DataType.VARCHAR, max_length=64)
    s.add_field("tenant", DataType.VARCHAR, max_length=64, is_partition_key=partition_key)
    if analyzer is None:
        s.add_field("text", DataType.VARCHAR, max_length=1024)
    else:
        s.add_field("text", DataType.VARCHAR, max_length=1024, enable_analyzer=True, analyzer_params=analyzer)
    s.add_field("metadata", DataType.JSON)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    if analyzer is not None:
        s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        s.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["text"],
                                output_field_names=["sparse"]))
    return s


FEATURE_TEXTS = ["退款申请需要多久到账", "快递配送范围包括新疆吗", "如何修改账户绑定的手机号",
                 "发票可以开具增值税专用发票吗", "订单取消后优惠券会退回吗"]


def probe_features(c: MilvusClient, index_type: str):
    """What semsearch's store uses beyond the basics: tenants (partition key), grouping, range search,
    delete by filter, BM25 (`chinese` analyzer and jieba tokenizer) and hybrid search."""
    v = vecs(40, seed=3)
    rows = [{"id": f"d{i // 2}#{i % 2}", "doc_id": f"d{i // 2}", "tenant": ("acme", "globex")[i % 2],
             "text": FEATURE_TEXTS[i % 5] + f" 第{i}条", "metadata": {"k": i % 4}, "vector": v[i].tolist()}
            for i in range(40)]
    for label, analyzer in (("chinese analyzer", {"type": "chinese"}), ("jieba tokenizer", {"tokenizer": "jieba"})):
        @step(f"BM25 function with {label}: create + insert + lexical search")
        def bm25(analyzer=analyzer):
            if c.has_collection(FEAT):
                c.drop_collection(FEAT)
            ip = c.prepare_index_params()
            ip.add_index(field_name="vector", index_type=index_type, metric_type="COSINE")
            ip.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            c.create_collection(FEAT, schema=feature_schema(c, analyzer), index_params=ip,
                                consistency_level="Strong")
            c.insert(FEAT, rows)
            r = c.search(FEAT, data=["退款到账"], anns_field="sparse", limit=3,
                         search_params={"metric_type": "BM25"}, output_fields=["text"])
            if not r[0] or "退款" not in r[0][0]["entity"]["text"]:
                raise AssertionError(f"lexical top hit is not the refund text: {r[0]}")
            return [h["entity"]["text"] for h in r[0]]
        bm25()
    if not c.has_collection(FEAT):  # no BM25 here: the dense-only schema the store falls back to
        ip = c.prepare_index_params()
        ip.add_index(field_name="vector", index_type=index_type, metric_type="COSINE")
        c.create_collection(FEAT, schema=feature_schema(c, None), index_params=ip, consistency_level="Strong")
        c.insert(FEAT, rows)

    @step("hybrid_search dense + BM25, RRF")
    def hybrid():
        from pymilvus import AnnSearchRequest, RRFRanker
        reqs = [AnnSearchRequest(data=[v[0].tolist()], anns_field="vector", limit=10, param={"metric_type": "COSINE"}),
                AnnSearchRequest(data=["退款到账"], anns_field="sparse", limit=10, param={"metric_type": "BM25"})]
        r = c.hybrid_search(FEAT, reqs, ranker=RRFRanker(60), limit=5, output_fields=["doc_id"])
        return [h["id"] for h in r[0]]
    hybrid()

    @step("partition-key tenant filter (search + upsert stays in its tenant)")
    def tenants():
        c.upsert(FEAT, [{**rows[0], "text": "改过的 退款"}])
        r = c.search(FEAT, data=[v[0].tolist()], anns_field="vector", filter='tenant == "acme"', limit=40,
                     output_fields=["tenant"])
        if not r[0] or any(h["entity"]["tenant"] != "acme" for h in r[0]) or r[0][0]["id"] != rows[0]["id"]:
            raise AssertionError(f"tenant filter leaked or missed the upserted row: {r[0][:3]}")
        return len(r[0])
    tenants()

    @step("search group_by_field=doc_id")
    def grouping():
        r = c.search(FEAT, data=[v[0].tolist()], anns_field="vector", limit=5, group_by_field="doc_id",
                     output_fields=["doc_id"])
        docs = [h["entity"]["doc_id"] for h in r[0]]
        if len(docs) != len(set(docs)):
            raise AssertionError(f"duplicate groups: {docs}")
        return docs
    grouping()

    @step("range search (radius / range_filter, COSINE)")
    def range_search():
        r = c.search(FEAT, data=[v[0].tolist()], anns_field="vector", limit=40,
                     search_params={"metric_type": "COSINE", "params": {"radius": 0.05, "range_filter": 1.01}})
        if not r[0] or any(not 0.05 < h["distance"] <= 1.01 for h in r[0]):
            raise AssertionError(f"distances outside the range: {[h['distance'] for h in r[0]]}")
        return len(r[0])
    range_search()

    @step("delete by filter (doc_id in [...] and tenant)")
    def delete_filter():
        c.delete(FEAT, filter='doc_id in ["d1", "d2"] and tenant == "globex"')
        left = c.query(FEAT, filter='doc_id in ["d1", "d2"]', output_fields=["id", "tenant"])
        if any(r["tenant"] == "globex" for r in left) or len(left) != 2:
            raise AssertionError(f"delete by filter left {left}")
        return len(left)
    delete_filter()


def restart_check(uri: str, before: int) -> None:
    """Close the embedded engine, open the same directory again: rows and index come back."""
    @step("restart: reopen the Lite directory, count(*) and search after load")
    def restart():
        import milvus_lite.server_manager as sm
        sm.server_manager_instance.release_server(uri)
        c = MilvusClient(uri=uri)
        count = c.query(FEAT, filter="", output_fields=["count(*)"])[0]["count(*)"]
        c.load_collection(FEAT)
        r = c.search(FEAT, data=[vecs(40, seed=3)[5].tolist()], anns_field="vector", limit=1)
        c.close()
        if count != before or not r[0]:
            raise AssertionError(f"after restart count={count} (before {before}) hits={r[0]}")
        return count
    restart()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["lite", "server", "uri"], required=True)
    ap.add_argument("--uri")
    ap.add_argument("--feature-index", default="FLAT",
                    help="vector index of the feature probe (Lite 2.5 refuses HNSW; 3.2 and servers take any)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="compat_", dir="/tmp")
    srv = None
    try:
        if args.backend == "lite":
            uri = os.path.join(tmp, "compat.db")
        elif args.backend == "server":
            from bench_store import MilvusServerHandle
            srv = MilvusServerHandle(os.path.join(tmp, "server"))
            uri = srv.start()
        else:
            uri = args.uri
        # A per-call deadline: pymilvus 2.5 retries some refusals (filter templates on Lite 2.5) for minutes.
        c = MilvusClient(uri=uri, timeout=15)
        try:
            version = c.get_server_version()
        except Exception as exc:  # Lite 2.5 does not implement GetVersion
            version = f"unknown ({type(exc).__name__})"
        import pymilvus
        print(f"# backend={args.backend} uri={uri} server_version={version} pymilvus={pymilvus.__version__}")
        probe(c)
        probe_features(c, args.feature_index)
        rows_before = c.query(FEAT, filter="", output_fields=["count(*)"])[0]["count(*)"]
        c.close()
        if args.backend == "lite":
            restart_check(uri, rows_before)
    finally:
        if srv:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for name, status, detail in RESULTS:
        print(f"{status:4} | {name} | {detail}")


if __name__ == "__main__":
    main()
