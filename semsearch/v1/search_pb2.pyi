from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

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

class ReturnField(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETURN_FIELD_UNSPECIFIED: _ClassVar[ReturnField]
    RETURN_FIELD_TEXT: _ClassVar[ReturnField]
    RETURN_FIELD_METADATA: _ClassVar[ReturnField]
FILTER_OPERATOR_UNSPECIFIED: FilterOperator
FILTER_OPERATOR_EQ: FilterOperator
FILTER_OPERATOR_NE: FilterOperator
FILTER_OPERATOR_GT: FilterOperator
FILTER_OPERATOR_GTE: FilterOperator
FILTER_OPERATOR_LT: FilterOperator
FILTER_OPERATOR_LTE: FilterOperator
FILTER_OPERATOR_IN: FilterOperator
FILTER_OPERATOR_NOT_IN: FilterOperator
RETURN_FIELD_UNSPECIFIED: ReturnField
RETURN_FIELD_TEXT: ReturnField
RETURN_FIELD_METADATA: ReturnField

class Document(_message.Message):
    __slots__ = ("id", "metadata", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata: _struct_pb2.Struct
    def __init__(self, id: str | None = ..., text: str | None = ..., metadata: _struct_pb2.Struct | _Mapping | None = ...) -> None: ...

class FilterValue(_message.Message):
    __slots__ = ("bool_value", "double_value", "int_value", "string_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    int_value: int
    double_value: float
    bool_value: bool
    def __init__(self, string_value: str | None = ..., int_value: int | None = ..., double_value: float | None = ..., bool_value: bool | None = ...) -> None: ...

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
    def __init__(self, field: str | None = ..., operator: FilterOperator | str | None = ..., value: FilterValue | _Mapping | None = ..., values: _Iterable[FilterValue | _Mapping] | None = ...) -> None: ...

class SearchDocumentsRequest(_message.Message):
    __slots__ = ("filters", "query", "return_chunks", "return_fields", "top_k")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    RETURN_FIELDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    filters: _containers.RepeatedCompositeFieldContainer[MetadataFilter]
    return_fields: _containers.RepeatedScalarFieldContainer[ReturnField]
    return_chunks: bool
    def __init__(self, query: str | None = ..., top_k: int | None = ..., filters: _Iterable[MetadataFilter | _Mapping] | None = ..., return_fields: _Iterable[ReturnField | str] | None = ..., return_chunks: bool | None = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("chunk_index", "id", "metadata", "score", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    text: str
    metadata: _struct_pb2.Struct
    chunk_index: int
    def __init__(self, id: str | None = ..., score: float | None = ..., text: str | None = ..., metadata: _struct_pb2.Struct | _Mapping | None = ..., chunk_index: int | None = ...) -> None: ...

class SearchTiming(_message.Message):
    __slots__ = ("encode_ms", "store_ms", "total_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    STORE_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    encode_ms: float
    store_ms: float
    def __init__(self, total_ms: float | None = ..., encode_ms: float | None = ..., store_ms: float | None = ...) -> None: ...

class SearchDocumentsResponse(_message.Message):
    __slots__ = ("collection", "hits", "model_version", "timing")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    model_version: str
    collection: str
    timing: SearchTiming
    def __init__(self, hits: _Iterable[SearchHit | _Mapping] | None = ..., model_version: str | None = ..., collection: str | None = ..., timing: SearchTiming | _Mapping | None = ...) -> None: ...

class BatchSearchDocumentsRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SearchDocumentsRequest]
    def __init__(self, requests: _Iterable[SearchDocumentsRequest | _Mapping] | None = ...) -> None: ...

class BatchSearchDocumentsResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[SearchDocumentsResponse]
    def __init__(self, responses: _Iterable[SearchDocumentsResponse | _Mapping] | None = ...) -> None: ...

class UpsertDocumentsRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Iterable[Document | _Mapping] | None = ...) -> None: ...

class UpsertDocumentsResponse(_message.Message):
    __slots__ = ("collection", "model_version", "upserted_count")
    UPSERTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    upserted_count: int
    model_version: str
    collection: str
    def __init__(self, upserted_count: int | None = ..., model_version: str | None = ..., collection: str | None = ...) -> None: ...

class DeleteDocumentsRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Iterable[str] | None = ...) -> None: ...

class DeleteDocumentsResponse(_message.Message):
    __slots__ = ("deleted_count",)
    DELETED_COUNT_FIELD_NUMBER: _ClassVar[int]
    deleted_count: int
    def __init__(self, deleted_count: int | None = ...) -> None: ...

class GetDocumentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: str | None = ...) -> None: ...

class GetDocumentResponse(_message.Message):
    __slots__ = ("collection", "document")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    document: Document
    collection: str
    def __init__(self, document: Document | _Mapping | None = ..., collection: str | None = ...) -> None: ...
