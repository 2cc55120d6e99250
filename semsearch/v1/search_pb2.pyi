from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FilterOperator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILTER_OPERATOR_UNSPECIFIED: _ClassVar[FilterOperator]
    FILTER_OPERATOR_EQ: _ClassVar[FilterOperator]
    FILTER_OPERATOR_NE: _ClassVar[FilterOperator]
    FILTER_OPERATOR_GT: _ClassVar[FilterOperator]
    FILTER_OPERATOR_GTE: _ClassVar[FilterOperator]
    FILTER_OPERATOR_LT: _ClassVar[FilterOperator]
    FILTER_OPERATOR_LTE: _ClassVar[FilterOperator]
    FILTER_OPERATOR_IN: _ClassVar[FilterOperator]
    FILTER_OPERATOR_NOT_IN: _ClassVar[FilterOperator]
    FILTER_OPERATOR_EXISTS: _ClassVar[FilterOperator]
    FILTER_OPERATOR_CONTAINS: _ClassVar[FilterOperator]
    FILTER_OPERATOR_CONTAINS_ANY: _ClassVar[FilterOperator]
    FILTER_OPERATOR_CONTAINS_ALL: _ClassVar[FilterOperator]

class LogicalOperator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGICAL_OPERATOR_UNSPECIFIED: _ClassVar[LogicalOperator]
    LOGICAL_OPERATOR_AND: _ClassVar[LogicalOperator]
    LOGICAL_OPERATOR_OR: _ClassVar[LogicalOperator]
    LOGICAL_OPERATOR_NOT: _ClassVar[LogicalOperator]

class ReturnField(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETURN_FIELD_UNSPECIFIED: _ClassVar[ReturnField]
    RETURN_FIELD_TEXT: _ClassVar[ReturnField]
    RETURN_FIELD_METADATA: _ClassVar[ReturnField]

class RetrievalMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_MODE_UNSPECIFIED: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_DENSE: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_LEXICAL: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_HYBRID: _ClassVar[RetrievalMode]

class FusionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_METHOD_UNSPECIFIED: _ClassVar[FusionMethod]
    FUSION_METHOD_RRF: _ClassVar[FusionMethod]
    FUSION_METHOD_WEIGHTED: _ClassVar[FusionMethod]
    FUSION_METHOD_MINMAX: _ClassVar[FusionMethod]
    FUSION_METHOD_DBSF: _ClassVar[FusionMethod]

class InputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_TYPE_UNSPECIFIED: _ClassVar[InputType]
    INPUT_TYPE_DOCUMENT: _ClassVar[InputType]
    INPUT_TYPE_QUERY: _ClassVar[InputType]
FILTER_OPERATOR_UNSPECIFIED: FilterOperator
FILTER_OPERATOR_EQ: FilterOperator
FILTER_OPERATOR_NE: FilterOperator
FILTER_OPERATOR_GT: FilterOperator
FILTER_OPERATOR_GTE: FilterOperator
FILTER_OPERATOR_LT: FilterOperator
FILTER_OPERATOR_LTE: FilterOperator
FILTER_OPERATOR_IN: FilterOperator
FILTER_OPERATOR_NOT_IN: FilterOperator
FILTER_OPERATOR_EXISTS: FilterOperator
FILTER_OPERATOR_CONTAINS: FilterOperator
FILTER_OPERATOR_CONTAINS_ANY: FilterOperator
FILTER_OPERATOR_CONTAINS_ALL: FilterOperator
LOGICAL_OPERATOR_UNSPECIFIED: LogicalOperator
LOGICAL_OPERATOR_AND: LogicalOperator
LOGICAL_OPERATOR_OR: LogicalOperator
LOGICAL_OPERATOR_NOT: LogicalOperator
RETURN_FIELD_UNSPECIFIED: ReturnField
RETURN_FIELD_TEXT: ReturnField
RETURN_FIELD_METADATA: ReturnField
RETRIEVAL_MODE_UNSPECIFIED: RetrievalMode
RETRIEVAL_MODE_DENSE: RetrievalMode
RETRIEVAL_MODE_LEXICAL: RetrievalMode
RETRIEVAL_MODE_HYBRID: RetrievalMode
FUSION_METHOD_UNSPECIFIED: FusionMethod
FUSION_METHOD_RRF: FusionMethod
FUSION_METHOD_WEIGHTED: FusionMethod
FUSION_METHOD_MINMAX: FusionMethod
FUSION_METHOD_DBSF: FusionMethod
INPUT_TYPE_UNSPECIFIED: InputType
INPUT_TYPE_DOCUMENT: InputType
INPUT_TYPE_QUERY: InputType

class Document(_message.Message):
    __slots__ = ("id", "text", "metadata", "tenant")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata: _struct_pb2.Struct
    tenant: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class FilterGroup(_message.Message):
    __slots__ = ("operator", "filters", "groups")
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    operator: LogicalOperator
    filters: _containers.RepeatedCompositeFieldContainer[MetadataFilter]
    groups: _containers.RepeatedCompositeFieldContainer[FilterGroup]
    def __init__(self, operator: _Optional[_Union[LogicalOperator, str]] = ..., filters: _Optional[_Iterable[_Union[MetadataFilter, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[FilterGroup, _Mapping]]] = ...) -> None: ...

class FilterValue(_message.Message):
    __slots__ = ("string_value", "int_value", "double_value", "bool_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    int_value: int
    double_value: float
    bool_value: bool
    def __init__(self, string_value: _Optional[str] = ..., int_value: _Optional[int] = ..., double_value: _Optional[float] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class MetadataFilter(_message.Message):
    __slots__ = ("field", "operator", "value", "values")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    field: str
    operator: FilterOperator
    value: FilterValue
    values: _containers.RepeatedCompositeFieldContainer[FilterValue]
    def __init__(self, field: _Optional[str] = ..., operator: _Optional[_Union[FilterOperator, str]] = ..., value: _Optional[_Union[FilterValue, _Mapping]] = ..., values: _Optional[_Iterable[_Union[FilterValue, _Mapping]]] = ...) -> None: ...

class SearchDocumentsRequest(_message.Message):
    __slots__ = ("query", "top_k", "filters", "return_fields", "return_chunks", "mode", "fusion", "min_score", "page_size", "page_token", "filter", "tenant", "rerank", "rerank_candidates", "highlight")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    RETURN_FIELDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    RERANK_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    HIGHLIGHT_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    filters: _containers.RepeatedCompositeFieldContainer[MetadataFilter]
    return_fields: _containers.RepeatedScalarFieldContainer[ReturnField]
    return_chunks: bool
    mode: RetrievalMode
    fusion: FusionOptions
    min_score: float
    page_size: int
    page_token: str
    filter: FilterGroup
    tenant: str
    rerank: bool
    rerank_candidates: int
    highlight: bool
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., filters: _Optional[_Iterable[_Union[MetadataFilter, _Mapping]]] = ..., return_fields: _Optional[_Iterable[_Union[ReturnField, str]]] = ..., return_chunks: _Optional[bool] = ..., mode: _Optional[_Union[RetrievalMode, str]] = ..., fusion: _Optional[_Union[FusionOptions, _Mapping]] = ..., min_score: _Optional[float] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[_Union[FilterGroup, _Mapping]] = ..., tenant: _Optional[str] = ..., rerank: _Optional[bool] = ..., rerank_candidates: _Optional[int] = ..., highlight: _Optional[bool] = ...) -> None: ...

class FusionOptions(_message.Message):
    __slots__ = ("method", "rrf_k", "dense_weight", "lexical_weight")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RRF_K_FIELD_NUMBER: _ClassVar[int]
    DENSE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    method: FusionMethod
    rrf_k: int
    dense_weight: float
    lexical_weight: float
    def __init__(self, method: _Optional[_Union[FusionMethod, str]] = ..., rrf_k: _Optional[int] = ..., dense_weight: _Optional[float] = ..., lexical_weight: _Optional[float] = ...) -> None: ...

class RetrieverScore(_message.Message):
    __slots__ = ("retriever", "score", "rank")
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    retriever: RetrievalMode
    score: float
    rank: int
    def __init__(self, retriever: _Optional[_Union[RetrievalMode, str]] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "text", "metadata", "chunk_index", "retrievers", "retrieval_score", "rerank_score", "retrieval_rank", "highlights", "snippet")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    RETRIEVERS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    RERANK_SCORE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_RANK_FIELD_NUMBER: _ClassVar[int]
    HIGHLIGHTS_FIELD_NUMBER: _ClassVar[int]
    SNIPPET_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    text: str
    metadata: _struct_pb2.Struct
    chunk_index: int
    retrievers: _containers.RepeatedCompositeFieldContainer[RetrieverScore]
    retrieval_score: float
    rerank_score: float
    retrieval_rank: int
    highlights: _containers.RepeatedCompositeFieldContainer[TextSpan]
    snippet: str
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., text: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., chunk_index: _Optional[int] = ..., retrievers: _Optional[_Iterable[_Union[RetrieverScore, _Mapping]]] = ..., retrieval_score: _Optional[float] = ..., rerank_score: _Optional[float] = ..., retrieval_rank: _Optional[int] = ..., highlights: _Optional[_Iterable[_Union[TextSpan, _Mapping]]] = ..., snippet: _Optional[str] = ...) -> None: ...

class TextSpan(_message.Message):
    __slots__ = ("start", "end", "text")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    text: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class SearchTiming(_message.Message):
    __slots__ = ("total_ms", "encode_ms", "store_ms", "rerank_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    STORE_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    encode_ms: float
    store_ms: float
    rerank_ms: float
    def __init__(self, total_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., store_ms: _Optional[float] = ..., rerank_ms: _Optional[float] = ...) -> None: ...

class SearchDocumentsResponse(_message.Message):
    __slots__ = ("hits", "model_version", "collection", "timing", "mode", "next_page_token", "reranker_version", "fusion", "retrieval_source")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RERANKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    model_version: str
    collection: str
    timing: SearchTiming
    mode: RetrievalMode
    next_page_token: str
    reranker_version: str
    fusion: FusionOptions
    retrieval_source: str
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., model_version: _Optional[str] = ..., collection: _Optional[str] = ..., timing: _Optional[_Union[SearchTiming, _Mapping]] = ..., mode: _Optional[_Union[RetrievalMode, str]] = ..., next_page_token: _Optional[str] = ..., reranker_version: _Optional[str] = ..., fusion: _Optional[_Union[FusionOptions, _Mapping]] = ..., retrieval_source: _Optional[str] = ...) -> None: ...

class BatchSearchDocumentsRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SearchDocumentsRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SearchDocumentsRequest, _Mapping]]] = ...) -> None: ...

class BatchSearchDocumentsResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[SearchDocumentsResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[SearchDocumentsResponse, _Mapping]]] = ...) -> None: ...

class UpsertDocumentsRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class UpsertDocumentsResponse(_message.Message):
    __slots__ = ("upserted_count", "model_version", "collection")
    UPSERTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    upserted_count: int
    model_version: str
    collection: str
    def __init__(self, upserted_count: _Optional[int] = ..., model_version: _Optional[str] = ..., collection: _Optional[str] = ...) -> None: ...

class DeleteDocumentsRequest(_message.Message):
    __slots__ = ("ids", "filters", "filter", "delete_all", "dry_run", "tenant")
    IDS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    DELETE_ALL_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    filters: _containers.RepeatedCompositeFieldContainer[MetadataFilter]
    filter: FilterGroup
    delete_all: bool
    dry_run: bool
    tenant: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., filters: _Optional[_Iterable[_Union[MetadataFilter, _Mapping]]] = ..., filter: _Optional[_Union[FilterGroup, _Mapping]] = ..., delete_all: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., tenant: _Optional[str] = ...) -> None: ...

class DeleteDocumentsResponse(_message.Message):
    __slots__ = ("deleted_count",)
    DELETED_COUNT_FIELD_NUMBER: _ClassVar[int]
    deleted_count: int
    def __init__(self, deleted_count: _Optional[int] = ...) -> None: ...

class GetDocumentRequest(_message.Message):
    __slots__ = ("id", "tenant")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class GetDocumentResponse(_message.Message):
    __slots__ = ("document", "collection")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    document: Document
    collection: str
    def __init__(self, document: _Optional[_Union[Document, _Mapping]] = ..., collection: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("input", "input_type", "dimensions")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    input: _containers.RepeatedScalarFieldContainer[str]
    input_type: InputType
    dimensions: int
    def __init__(self, input: _Optional[_Iterable[str]] = ..., input_type: _Optional[_Union[InputType, str]] = ..., dimensions: _Optional[int] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model_version", "model", "token_count")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    model_version: str
    model: str
    token_count: int
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., model_version: _Optional[str] = ..., model: _Optional[str] = ..., token_count: _Optional[int] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "texts")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    query: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, query: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("scores", "reranker_version", "activation")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RERANKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    reranker_version: str
    activation: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., reranker_version: _Optional[str] = ..., activation: _Optional[str] = ...) -> None: ...
