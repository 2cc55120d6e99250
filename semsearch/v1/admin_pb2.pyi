from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServingPairState(_message.Message):
    __slots__ = ("model_version", "collection", "in_flight")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    collection: str
    in_flight: int
    def __init__(self, model_version: _Optional[str] = ..., collection: _Optional[str] = ..., in_flight: _Optional[int] = ...) -> None: ...

class GetServingStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServingStateResponse(_message.Message):
    __slots__ = ("current", "pending", "registry_generation", "name", "registry_watch_error", "registry_watch_failures", "reranker_version")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_GENERATION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_WATCH_ERROR_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_WATCH_FAILURES_FIELD_NUMBER: _ClassVar[int]
    RERANKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    current: ServingPairState
    pending: ServingPairState
    registry_generation: int
    name: str
    registry_watch_error: str
    registry_watch_failures: int
    reranker_version: str
    def __init__(self, current: _Optional[_Union[ServingPairState, _Mapping]] = ..., pending: _Optional[_Union[ServingPairState, _Mapping]] = ..., registry_generation: _Optional[int] = ..., name: _Optional[str] = ..., registry_watch_error: _Optional[str] = ..., registry_watch_failures: _Optional[int] = ..., reranker_version: _Optional[str] = ...) -> None: ...

class ReloadServingStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeCollectionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HistoryEvent(_message.Message):
    __slots__ = ("at", "event", "details")
    AT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    at: str
    event: str
    details: _struct_pb2.Struct
    def __init__(self, at: _Optional[str] = ..., event: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class DescribeCollectionResponse(_message.Message):
    __slots__ = ("name", "collection", "model_version", "documents", "chunks", "lexical", "tenants", "metadata_fields", "tuned_retrieval", "history")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELDS_FIELD_NUMBER: _ClassVar[int]
    TUNED_RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    collection: str
    model_version: str
    documents: int
    chunks: int
    lexical: bool
    tenants: bool
    metadata_fields: _containers.RepeatedScalarFieldContainer[str]
    tuned_retrieval: str
    history: _containers.RepeatedCompositeFieldContainer[HistoryEvent]
    def __init__(self, name: _Optional[str] = ..., collection: _Optional[str] = ..., model_version: _Optional[str] = ..., documents: _Optional[int] = ..., chunks: _Optional[int] = ..., lexical: _Optional[bool] = ..., tenants: _Optional[bool] = ..., metadata_fields: _Optional[_Iterable[str]] = ..., tuned_retrieval: _Optional[str] = ..., history: _Optional[_Iterable[_Union[HistoryEvent, _Mapping]]] = ...) -> None: ...

class ReloadServingStateResponse(_message.Message):
    __slots__ = ("state", "changed")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    state: GetServingStateResponse
    changed: bool
    def __init__(self, state: _Optional[_Union[GetServingStateResponse, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...
