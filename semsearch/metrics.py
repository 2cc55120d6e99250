"""Prometheus metrics shared by the service and the indexer (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

RPC_REQUESTS = Counter("semsearch_rpc_requests_total", "gRPC calls by method and status code", ["method", "code"])
# Per pod, the number the HPA scales on (helm/semsearch autoscaling.metric=custom, via prometheus-adapter).
RPC_IN_FLIGHT = Gauge("semsearch_inflight_requests", "gRPC calls being handled now (all methods)")
RPC_LATENCY = Histogram("semsearch_rpc_latency_seconds", "gRPC call latency by method and status code",
                        ["method", "code"], buckets=LATENCY_BUCKETS)
ENCODER_BATCH_SIZE = Histogram("semsearch_encoder_batch_texts", "Texts per encoder forward pass (queries)",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
ENCODER_QUEUE_WAIT = Histogram("semsearch_encoder_queue_wait_seconds", "Time a query waits for the encoder",
                               buckets=LATENCY_BUCKETS)
ENCODER_LATENCY = Histogram("semsearch_encoder_latency_seconds", "Encoder forward pass time", ["kind"],
                            buckets=LATENCY_BUCKETS)
ENCODER_QUEUE_DEPTH = Gauge("semsearch_encoder_queue_depth", "Queries waiting for the encoder")
STORE_LATENCY = Histogram("semsearch_store_latency_seconds", "Milvus call latency by operation and outcome",
                          ["operation", "outcome"], buckets=LATENCY_BUCKETS)
MODEL_INFO = Gauge("semsearch_model_info", "The serving (model version, collection) pair: 1 for the current one",
                   ["model_version", "collection"])
RERANK_BATCH_SIZE = Histogram("semsearch_rerank_batch_pairs", "(query, passage) pairs per reranker call",
                              buckets=(1, 8, 16, 32, 50, 64, 100, 200, 400, 800))
RERANK_LATENCY = Histogram("semsearch_rerank_latency_seconds", "Reranker call time (one micro-batch)",
                           buckets=LATENCY_BUCKETS)
RERANKER_INFO = Gauge("semsearch_reranker_info", "The serving reranker version: 1 for the current one",
                      ["reranker_version"])
REGISTRY_WATCH_ERRORS = Counter("semsearch_registry_watch_errors_total",
                                "Registry polls that failed (the instance keeps serving its pair and retries)")
SERVING = Gauge("semsearch_serving", "1 when health reports SERVING")
INDEXER_DOCUMENTS = Counter("semsearch_indexer_documents_total", "Documents processed by the indexer", ["outcome"])
INDEXER_CHUNKS = Counter("semsearch_indexer_chunks_written_total", "Chunks written by the indexer")


def set_model_info(model_version: str, collection: str) -> None:
    MODEL_INFO.clear()
    MODEL_INFO.labels(model_version=model_version, collection=collection).set(1)


def set_reranker_info(reranker_version: str) -> None:
    """The reranker an instance serves ('' = none), beside the model info."""
    RERANKER_INFO.clear()
    if reranker_version:
        RERANKER_INFO.labels(reranker_version=reranker_version).set(1)
