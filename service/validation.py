"""Request validation: protobuf messages in, typed domain values out, or InvalidInputError with a reason."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from semsearch.config import Settings
from semsearch.errors import InvalidInputError
from semsearch.filters import (
    MAX_GROUP_DEPTH,
    MULTI_VALUE,
    Condition,
    FilterGroup,
    Logic,
    MetadataFilter,
    Operator,
    Scalar,
    check_group_limits,
)
from semsearch.fusion import Fusion
from semsearch.ingest import MAX_METADATA_DEPTH, check_id, check_metadata, check_query, check_text
from semsearch.v1 import search_pb2 as pb
from service.engine import DocumentInput, SearchQuery, check_unique_ids
from service.paging import Cursor

_OPERATORS = {
    pb.FILTER_OPERATOR_EQ: Operator.EQ, pb.FILTER_OPERATOR_NE: Operator.NE,
    pb.FILTER_OPERATOR_GT: Operator.GT, pb.FILTER_OPERATOR_GTE: Operator.GTE,
    pb.FILTER_OPERATOR_LT: Operator.LT, pb.FILTER_OPERATOR_LTE: Operator.LTE,
    pb.FILTER_OPERATOR_IN: Operator.IN, pb.FILTER_OPERATOR_NOT_IN: Operator.NOT_IN,
    pb.FILTER_OPERATOR_EXISTS: Operator.EXISTS, pb.FILTER_OPERATOR_CONTAINS: Operator.CONTAINS,
    pb.FILTER_OPERATOR_CONTAINS_ANY: Operator.CONTAINS_ANY, pb.FILTER_OPERATOR_CONTAINS_ALL: Operator.CONTAINS_ALL,
}
_LOGIC = {pb.LOGICAL_OPERATOR_AND: Logic.AND, pb.LOGICAL_OPERATOR_OR: Logic.OR, pb.LOGICAL_OPERATOR_NOT: Logic.NOT}


def query_text(text: str, settings: Settings, where: str = "query") -> str:
    return check_query(text, settings.max_query_chars, where)


def top_k(value: int, settings: Settings, where: str = "top_k") -> int:
    """AIP-158 style: 0 means default, above the maximum is lowered to it, negative is an error."""
    if value < 0:
        raise InvalidInputError(f"{where} must not be negative (got {value})")
    if value == 0:
        return min(settings.default_top_k, settings.max_top_k)
    return min(value, settings.max_top_k)


def filter_value(value: pb.FilterValue, where: str) -> Scalar:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidInputError(f"{where}: value is not set")
    return getattr(value, kind)  # type: ignore[no-any-return]


def metadata_filter(item: pb.MetadataFilter, where: str) -> MetadataFilter:
    operator = _OPERATORS.get(item.operator)
    if operator is None:
        raise InvalidInputError(f"{where}: operator is unspecified or unknown ({item.operator})")
    if operator is Operator.EXISTS:
        if item.HasField("value") or item.values:
            raise InvalidInputError(f"{where}: EXISTS takes neither `value` nor `values`")
        values: tuple[Scalar, ...] = ()
    elif operator in MULTI_VALUE:
        if item.HasField("value"):
            raise InvalidInputError(f"{where}: {operator.name} takes `values`, not `value`")
        values = tuple(filter_value(v, f"{where}.values[{i}]") for i, v in enumerate(item.values))
    else:
        if item.values:
            raise InvalidInputError(f"{where}: {operator.name} takes `value`, not `values`")
        if not item.HasField("value"):
            raise InvalidInputError(f"{where}: value is not set")
        values = (filter_value(item.value, where),)
    return MetadataFilter(field=item.field, operator=operator, values=values)


def filter_group(group: pb.FilterGroup, where: str) -> FilterGroup:
    """A typed group tree; depth and size are checked level by level before going deeper."""
    level, size = [group], 0
    for depth in range(1, MAX_GROUP_DEPTH + 2):
        size += sum(len(g.filters) for g in level)
        check_group_limits(depth, size, where)
        level = [child for g in level for child in g.groups]
        if not level:
            break
    return _group(group, where)


def _group(group: pb.FilterGroup, where: str) -> FilterGroup:
    logic = _LOGIC.get(group.operator)
    if logic is None:
        raise InvalidInputError(f"{where}.operator: unspecified or unknown logical operator ({group.operator})")
    if not group.filters and not group.groups:
        raise InvalidInputError(f"{where}: a {logic.name} group needs at least one filter or group")
    return FilterGroup(
        logic=logic,
        filters=tuple(metadata_filter(f, f"{where}.filters[{i}]") for i, f in enumerate(group.filters)),
        groups=tuple(_group(g, f"{where}.groups[{i}]") for i, g in enumerate(group.groups)),
    )


def conditions(filters: Sequence[pb.MetadataFilter], group: pb.FilterGroup | None, settings: Settings,
               prefix: str = "") -> tuple[Condition, ...]:
    """`filters` (ANDed) and the boolean `filter` group of a request, typed."""
    if len(filters) > settings.max_filters:
        raise InvalidInputError(f"{prefix}filters: at most {settings.max_filters} filters")
    typed: list[Condition] = [metadata_filter(f, f"{prefix}filters[{i}]") for i, f in enumerate(filters)]
    if group is not None:
        typed.append(filter_group(group, f"{prefix}filter"))
    return tuple(typed)


def min_score(request: pb.SearchDocumentsRequest, where: str = "min_score") -> float | None:
    if not request.HasField("min_score"):
        return None
    if not math.isfinite(request.min_score):
        raise InvalidInputError(f"{where} must be a finite number, got {request.min_score}")
    return float(request.min_score)


MODES = {pb.RETRIEVAL_MODE_UNSPECIFIED: "", pb.RETRIEVAL_MODE_DENSE: "dense",
          pb.RETRIEVAL_MODE_LEXICAL: "lexical", pb.RETRIEVAL_MODE_HYBRID: "hybrid"}
FUSIONS = {pb.FUSION_METHOD_RRF: "rrf", pb.FUSION_METHOD_WEIGHTED: "weighted", pb.FUSION_METHOD_MINMAX: "minmax",
            pb.FUSION_METHOD_DBSF: "dbsf"}
MAX_RRF_K = 10000


def retrieval(request: pb.SearchDocumentsRequest, settings: Settings, prefix: str = "") -> tuple[str, Fusion | None]:
    """The request's retrieval mode ("" = server default) and fusion (None = the collection's or settings')."""
    if request.mode not in MODES:
        raise InvalidInputError(f"{prefix}mode: unknown retrieval mode {request.mode}")
    if not request.HasField("fusion"):
        return MODES[request.mode], None
    options = request.fusion
    if options.method != pb.FUSION_METHOD_UNSPECIFIED and options.method not in FUSIONS:
        raise InvalidInputError(f"{prefix}fusion.method: unknown fusion method {options.method}")
    if not 0 <= options.rrf_k <= MAX_RRF_K:
        raise InvalidInputError(f"{prefix}fusion.rrf_k must be 1 to {MAX_RRF_K} (0 = default), got {options.rrf_k}")
    for name in ("dense_weight", "lexical_weight"):
        weight = getattr(options, name)
        if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
            raise InvalidInputError(f"{prefix}fusion.{name} must be in [0, 1], got {weight}")
    default = Fusion.from_settings(settings)
    weights_given = options.dense_weight > 0 or options.lexical_weight > 0
    fusion = Fusion(
        method=FUSIONS.get(options.method, default.method),
        rrf_k=options.rrf_k or default.rrf_k,
        dense_weight=options.dense_weight if weights_given else default.dense_weight,
        lexical_weight=options.lexical_weight if weights_given else default.lexical_weight,
    )
    return MODES[request.mode], fusion


def search_query(request: pb.SearchDocumentsRequest, settings: Settings, where: str = "", *, tenant: str = "",
                 cursor: Cursor | None = None) -> SearchQuery:
    """The complete query of a request: validated fields, retrieval mode and fusion, the tenant the call
    resolved to, and with a page token's `cursor` the ranking its first page fixed."""
    prefix = f"{where}." if where else ""
    filters = conditions(request.filters, request.filter if request.HasField("filter") else None, settings, prefix)
    fields = set(request.return_fields)
    if pb.RETURN_FIELD_UNSPECIFIED in fields or not fields <= {pb.RETURN_FIELD_TEXT, pb.RETURN_FIELD_METADATA}:
        raise InvalidInputError(f"{prefix}return_fields: unspecified or unknown field")
    if request.page_size < 0:
        raise InvalidInputError(f"{prefix}page_size must not be negative (got {request.page_size})")
    if request.page_token and not request.page_size:
        raise InvalidInputError(f"{prefix}page_token needs page_size (the size of the next page)")
    paged = request.page_size > 0
    if paged and request.rerank:
        raise InvalidInputError(f"{prefix}rerank cannot be combined with page_size: a reranked search orders "
                                "at most rerank_candidates hits; ask for them with top_k")
    # Paging: page_size replaces top_k (capped at the same maximum; AIP-158).
    k = min(request.page_size, settings.max_top_k) if paged else top_k(request.top_k, settings, f"{prefix}top_k")
    mode, fusion = retrieval(request, settings, prefix)
    query = SearchQuery(
        text=query_text(request.query, settings, f"{prefix}query"),
        top_k=k, mode=mode, fusion=fusion, tenant=tenant,
        rerank=request.rerank,
        rerank_candidates=rerank_candidates(request, k, settings, prefix) if request.rerank else 0,
        filters=filters,
        with_text=not fields or pb.RETURN_FIELD_TEXT in fields,
        with_metadata=not fields or pb.RETURN_FIELD_METADATA in fields,
        return_chunks=request.return_chunks,
        min_score=min_score(request, f"{prefix}min_score"),
        paged=paged,
    )
    if cursor is not None:
        # Later pages rank as the first did: its mode, fusion and hybrid candidate pool.
        query = dataclasses.replace(query, offset=cursor.offset, pinned=(cursor.model_version, cursor.collection),
                                    mode=cursor.mode or query.mode, fusion=cursor.fusion or query.fusion,
                                    pool_depth=cursor.pool_depth)
    if paged and query.offset + query.top_k > settings.max_page_depth:
        raise InvalidInputError(f"{prefix}page_size: paging goes at most {settings.max_page_depth} hits "
                                "deep (max_page_depth); narrow the query with filters or min_score")
    return query


def rerank_candidates(request: pb.SearchDocumentsRequest, k: int, settings: Settings, prefix: str = "") -> int:
    """How many candidates to rerank: 0 means the `rerank_candidates` setting (at least top_k);
    otherwise from top_k to `max_rerank_candidates`."""
    limit = settings.max_rerank_candidates
    value = request.rerank_candidates
    if value == 0:
        value = max(settings.rerank_candidates, k)
        if value > limit:
            raise InvalidInputError(
                f"{prefix}top_k {k} is above max_rerank_candidates {limit}: rerank at most {limit} hits")
        return value
    if not k <= value <= limit:
        raise InvalidInputError(
            f"{prefix}rerank_candidates must be between top_k ({k}) and max_rerank_candidates ({limit}) "
            f"(0 = the default {settings.rerank_candidates}), got {value}")
    return value


def batch_size(request: pb.BatchSearchDocumentsRequest, settings: Settings) -> None:
    if not request.requests:
        raise InvalidInputError("requests is empty")
    if len(request.requests) > settings.max_batch_queries:
        raise InvalidInputError(f"at most {settings.max_batch_queries} queries per batch")

def document_id(value: str, where: str) -> str:
    return check_id(value, where)

def _depth_of_struct(struct: Any, limit: int = MAX_METADATA_DEPTH + 1) -> int:
    """Depth of a protobuf Struct without converting it (a hostile one may be very deep)."""
    depth, frontier = 0, [struct]
    while frontier and depth <= limit:
        depth += 1
        children = []
        for node in frontier:
            values = node.fields.values() if hasattr(node, "fields") else node.values
            for item in values:
                kind = item.WhichOneof("kind")
                if kind == "struct_value":
                    children.append(item.struct_value)
                elif kind == "list_value":
                    children.append(item.list_value)
        frontier = children
    return depth

def metadata(struct: Any, settings: Settings, where: str) -> dict[str, Any]:
    # Checked on the message first: converting a hostile, very deep one would recurse deeply.
    if _depth_of_struct(struct) > MAX_METADATA_DEPTH:
        raise InvalidInputError(f"{where} is nested deeper than {MAX_METADATA_DEPTH} levels")
    try:
        value = json_format.MessageToDict(struct)
    except (ValueError, json_format.Error) as exc:
        raise InvalidInputError(f"{where} is not valid JSON: {exc}") from exc
    return check_metadata(value, settings.max_metadata_bytes, where)

def documents(request: pb.UpsertDocumentsRequest, settings: Settings) -> list[DocumentInput]:
    if not request.documents:
        raise InvalidInputError("documents is empty")
    if len(request.documents) > settings.max_upsert_documents:
        raise InvalidInputError(f"at most {settings.max_upsert_documents} documents per call")
    out = []
    for i, doc in enumerate(request.documents):
        where = f"documents[{i}]"
        out.append(DocumentInput(
            doc_id=document_id(doc.id, f"{where}.id"),
            text=check_text(doc.text, settings.max_document_chars, f"{where}.text"),
            metadata=metadata(doc.metadata, settings, f"{where}.metadata"),
        ))
    check_unique_ids([d.doc_id for d in out])
    return out

@dataclass(frozen=True)
class DeleteRequest:
    ids: list[str]  # by ids, or
    conditions: tuple[Condition, ...]  # by filter ((): delete_all)
    dry_run: bool

def delete_request(request: pb.DeleteDocumentsRequest, settings: Settings) -> DeleteRequest:
    """Exactly one of ids, filters, delete_all: an empty filter never deletes everything by accident."""
    group = request.filter if request.HasField("filter") else None
    by_filter = bool(request.filters) or group is not None
    given = sum((bool(request.ids), by_filter, request.delete_all))
    if given == 0:
        raise InvalidInputError("ids is empty and there is no filter (deleting every document of the tenant "
                                "needs delete_all: an empty filter is refused)")
    if given > 1:
        raise InvalidInputError("give exactly one of ids, filters/filter, delete_all")
    if request.ids:
        return DeleteRequest(ids=delete_ids(request.ids, settings), conditions=(), dry_run=request.dry_run)
    return DeleteRequest(ids=[], conditions=conditions(request.filters, group, settings) if by_filter else (),
                         dry_run=request.dry_run)

def delete_ids(ids: Sequence[str], settings: Settings) -> list[str]:
    if not ids:
        raise InvalidInputError("ids is empty")
    if len(ids) > settings.max_upsert_documents:
        raise InvalidInputError(f"at most {settings.max_upsert_documents} ids per call")
    return list(dict.fromkeys(document_id(v, f"ids[{i}]") for i, v in enumerate(ids)))
