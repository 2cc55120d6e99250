"""Embed and Rerank: the serving model and reranker offered directly (behind /v1/embeddings, /v1/rerank).

Queries go through the serving pair's query micro-batcher (the one searches use), so they share
forward passes with concurrent searches. Documents go through a micro-batcher of their own whose
payloads carry the encoder they were read with: a model swap between submit and the forward pass
never mixes versions, and one batcher serves every pair the service ever holds.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import numpy as np

from semsearch.config import Settings
from semsearch.encoders import Encoder
from semsearch.errors import InvalidInputError, RerankerNotConfiguredError
from semsearch.ingest import check_query, check_text
from semsearch.metrics import ENCODER_LATENCY
from semsearch.v1 import search_pb2 as pb
from service.batching import MicroBatcher
from service.engine import SearchEngine

DocumentBatch = tuple[Encoder, list[str]]


class DocumentEncodeBatcher(MicroBatcher[DocumentBatch, np.ndarray]):
    """Document texts of concurrent Embed calls in one forward pass per encoder (units: texts)."""

    def __init__(self, **options: object) -> None:
        def process(payloads: list[DocumentBatch], timeout_s: float | None) -> list[np.ndarray]:
            results: list[np.ndarray | None] = [None] * len(payloads)
            by_encoder: dict[int, list[int]] = {}
            for index, (encoder, _) in enumerate(payloads):
                by_encoder.setdefault(id(encoder), []).append(index)
            for indices in by_encoder.values():
                encoder = payloads[indices[0]][0]
                with ENCODER_LATENCY.labels(kind="document").time():
                    vectors = encoder.encode_documents([t for i in indices for t in payloads[i][1]],
                                                       timeout_s=timeout_s)
                bounds = np.cumsum([0, *(len(payloads[i][1]) for i in indices)])
                for i, (start, end) in zip(indices, itertools.pairwise(bounds), strict=True):
                    results[i] = vectors[start:end]
            return [r for r in results if r is not None]

        super().__init__(process, weight=lambda payload: len(payload[1]), name="encoder-documents",
                         **options)  # type: ignore[arg-type]
        self._callers = 0

    async def submit(self, payload: DocumentBatch, timeout_s: float | None = None) -> np.ndarray:
        """Runs the worker while callers wait and stops it when the last leaves: nothing outlives a
        burst, so the service needs no hook to close this batcher (its thread idles)."""
        self.start()
        self._callers += 1
        try:
            return await super().submit(payload, timeout_s)
        finally:
            self._callers -= 1
            if self._callers == 0 and self._worker is not None:
                self._worker.cancel()
                self._worker = None


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray
    model_version: str
    model: str
    token_count: int


def embed_inputs(request: pb.EmbedRequest, settings: Settings) -> list[str]:
    """The request's texts, or InvalidInputError naming the field (`input`, `input[3]`, `dimensions`)."""
    if not request.input:
        raise InvalidInputError("input: give at least one text")
    if len(request.input) > settings.max_embed_inputs:
        raise InvalidInputError(f"input: {len(request.input)} texts; at most {settings.max_embed_inputs} per call "
                                "(max_embed_inputs): split the list")
    if request.input_type not in (pb.INPUT_TYPE_UNSPECIFIED, pb.INPUT_TYPE_DOCUMENT, pb.INPUT_TYPE_QUERY):
        raise InvalidInputError(f"input_type: unknown input type {request.input_type}")
    if request.dimensions < 0:
        raise InvalidInputError(f"dimensions must not be negative (got {request.dimensions})")
    check = check_query if request.input_type == pb.INPUT_TYPE_QUERY else check_text
    limit = settings.max_query_chars if request.input_type == pb.INPUT_TYPE_QUERY else settings.max_document_chars
    return [check(text, limit, f"input[{i}]") for i, text in enumerate(request.input)]


class EmbedService:
    """What the Embed and Rerank RPCs do with the engine; owns the document micro-batcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.documents = DocumentEncodeBatcher(max_batch=settings.microbatch_max_size,
                                               max_wait_s=settings.microbatch_max_wait_ms / 1000.0,
                                               queue_size=settings.microbatch_queue_size)

    async def embed(self, engine: SearchEngine, request: pb.EmbedRequest, timeout_s: float | None) -> Embedded:
        texts = embed_inputs(request, self.settings)
        with engine.pair.held() as pair:
            manifest = pair.encoder.manifest
            if request.dimensions and request.dimensions != manifest.dimension:
                raise InvalidInputError(f"dimensions: {request.dimensions} is not the model's dimension "
                                        f"({manifest.dimension}); leave it out (no truncated embeddings)")
            texts = [pair.planner.normalize(text) for text in texts]
            if request.input_type == pb.INPUT_TYPE_QUERY:
                encoding = pair.batcher.encode(texts, timeout_s)
            else:
                encoding = self.documents.submit((pair.encoder, texts), timeout_s)
            # Counting tokens (for `usage`) overlaps the forward pass.
            tokens, vectors = await asyncio.gather(asyncio.to_thread(pair.encoder.count_tokens, texts), encoding)
            return Embedded(vectors=vectors, model_version=manifest.version, model=manifest.name,
                            token_count=sum(tokens))

    async def rerank(self, engine: SearchEngine, request: pb.RerankRequest,
                     timeout_s: float | None) -> pb.RerankResponse:
        query = check_query(request.query, self.settings.max_query_chars, "query")
        if not request.texts:
            raise InvalidInputError("texts: give at least one text")
        if len(request.texts) > self.settings.max_rerank_candidates:
            raise InvalidInputError(f"texts: {len(request.texts)} texts; at most "
                                    f"{self.settings.max_rerank_candidates} per call (max_rerank_candidates)")
        texts = [check_text(text, self.settings.max_document_chars, f"texts[{i}]")
                 for i, text in enumerate(request.texts)]
        stage = engine.rerank
        if stage is None:
            raise RerankerNotConfiguredError("this service has no reranker: set reranker_model (and reranker_url "
                                             "for a rerank server), or promote one with `semsearch promote "
                                             "--reranker DIR`")
        with stage.held():
            normalize = engine.pair.planner.normalize
            scores = await stage.batcher.score([(normalize(query), normalize(text)) for text in texts], timeout_s)
        return pb.RerankResponse(scores=scores, reranker_version=stage.version,
                                 activation=stage.reranker.manifest.activation)

    async def close(self) -> None:
        await self.documents.close()


def embed_response(embedded: Embedded) -> pb.EmbedResponse:
    return pb.EmbedResponse(embeddings=[pb.Embedding(values=row) for row in np.asarray(embedded.vectors)],
                            model_version=embedded.model_version, model=embedded.model,
                            token_count=embedded.token_count)
