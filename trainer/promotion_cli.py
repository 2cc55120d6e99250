"""`semsearch promote`, `semsearch rollback`, `semsearch gc`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from semsearch.cli import (
    EXIT_FAILED,
    EXIT_REFUSED,
    CollectionOption,
    ConfigOption,
    DeviceOption,
    EncoderUrlOption,
    MilvusUriOption,
    fail,
    settings_from_cli,
)
from semsearch.config import Settings
from semsearch.encoders import create_encoder
from semsearch.errors import ConflictError, SemsearchError
from semsearch.promotion import Promoter, PromotionError, PromotionReport
from semsearch.registry import PairRecord
from semsearch.store import MilvusStore
from trainer.promotion import GateResult, gate

console = Console(stderr=True)


def exit_code(exc: SemsearchError) -> int:
    """3 for a refusal that left everything consistent (validation, state checks, another writer won),
    so scripts can tell "not now" from a crash (1)."""
    return EXIT_REFUSED if isinstance(exc, PromotionError | ConflictError) else EXIT_FAILED


def _store(settings: Settings) -> MilvusStore:
    return MilvusStore.from_settings(settings, min_timeout_s=60.0)


def _print_report(report: PromotionReport) -> None:
    copy, replay = report.copy, report.replay
    console.print(
        f"[bold]{report.name}[/bold]: {report.from_pair.model_version} ({report.from_pair.collection}) "
        f"→ {report.to_pair.model_version} ({report.to_pair.collection})"
    )
    if copy is not None:
        console.print(
            f"re-embedded {copy.written} chunks ({copy.skipped} already there) in {copy.seconds:.1f} s, "
            f"{copy.chunks_per_s:.1f} chunks/s"
        )
    if replay is not None:
        console.print(f"replayed {replay.written} chunks written meanwhile; removed {report.orphans_removed} orphans")
    console.print(f"validation: {json.dumps(report.validation, ensure_ascii=False)}")
    console.print(f"timings (s): {report.timings_s}")


def _progress(phase: str, stats: object) -> None:
    console.print(
        f"  {phase}: {getattr(stats, 'written', 0)} written, {getattr(stats, 'skipped', 0)} skipped", end="\r"
    )


def promote(
    candidate: Annotated[
        str | None, typer.Argument(help="Candidate model: local directory (with its manifest) or hub id")
    ] = None,
    collection: CollectionOption = None,
    milvus_uri: MilvusUriOption = None,
    config: ConfigOption = None,
    device: DeviceOption = None,
    encoder_url: EncoderUrlOption = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Held-out JSONL rows {query, pos, neg} for the gate")
    ] = None,
    metric: Annotated[str, typer.Option("--metric", help="Gate metric (global pool)")] = "recall@1",
    min_improvement: Annotated[float, typer.Option("--min-improvement", help="Required gain in the metric")] = 0.01,
    guards: Annotated[
        list[str] | None,
        typer.Option("--guard", help="METRIC=TOLERANCE that must not regress more than TOLERANCE (repeatable)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Skip the gate (logged in the registry)")] = False,
    abort: Annotated[bool, typer.Option("--abort", help="Forget a pending promotion and stop")] = False,
    candidate_encoder_url: Annotated[
        str | None,
        typer.Option("--candidate-encoder-url", help="Servers that serve the candidate (blue/green sglang)"),
    ] = None,
    reranker: Annotated[
        str | None,
        typer.Option("--reranker", help="Promote this cross-encoder (directory or hub id) instead of a model: "
                                        "gated on retrieval then rerank, swapped without re-embedding"),
    ] = None,
    reranker_url: Annotated[
        str | None, typer.Option("--reranker-url", help="Rerank servers that serve the candidate reranker"),
    ] = None,
    rerank_candidates: Annotated[
        int | None, typer.Option("--rerank-candidates", help="Candidates each reranker re-orders in the gate"),
    ] = None,
) -> None:
    """Gate, re-embed, validate and swap a candidate model in, without a failed query; or, with
    --reranker, gate and swap a reranker."""
    settings = settings_from_cli(
        config, collection=collection, milvus_uri=milvus_uri, device=device, encoder_url=encoder_url
    )
    name = settings.collection
    if (candidate is None) == (reranker is None) and not abort:
        raise fail("give a candidate model, or --reranker DIR (not both)", 2)
    store = _store(settings)
    promoter = Promoter(settings, store, progress=_progress)
    try:
        if abort:
            record = promoter.abort(name)
            console.print(
                f"{name}: no pending promotion; serving {record.current.model_version if record.current else '-'}"
            )
            return
        guard_map = dict(_parse_guard(g) for g in guards or ["mrr@10=0.02"])
        if reranker is not None:
            if not force and eval_data is None:
                raise fail("the gate needs --eval-data (held-out rows), or --force to skip it", 2)
            _promote_reranker(settings, promoter, reranker, reranker_url, eval_data, force=force, metric=metric,
                              min_improvement=min_improvement, guards=guard_map,
                              candidates=rerank_candidates or settings.rerank_candidates)
            return
        assert candidate is not None
        if not force and eval_data is None and not _resuming(promoter, name):
            raise fail("the gate needs --eval-data (held-out rows), or --force to skip it", 2)
        gate_spec = _GateSpec(eval_data, force=force, metric=metric, min_improvement=min_improvement,
                              guards=guard_map)
        _print_report(_promote_model(settings, promoter, candidate, candidate_encoder_url, gate_spec))
    except SemsearchError as exc:
        raise fail(str(exc), exit_code(exc)) from exc
    finally:
        store.close()

def rollback(
    collection: CollectionOption = None,
    milvus_uri: MilvusUriOption = None,
    config: ConfigOption = None,
    device: DeviceOption = None,
    encoder_url: EncoderUrlOption = None,
    reranker: Annotated[
        bool, typer.Option("--reranker", help="Return to the previous reranker (the pair stays)")
    ] = False,
) -> None:
    """Return to the previous (model, collection) pair the same way a promotion goes forward."""
    settings = settings_from_cli(
        config, collection=collection, milvus_uri=milvus_uri, device=device, encoder_url=encoder_url
    )
    store = _store(settings)
    try:
        if reranker:
            record = Promoter(settings, store).registry.rollback_reranker(settings.collection)
            assert record.reranker is not None
            console.print(f"{settings.collection}: reranker {record.reranker.version or 'none'} "
                          f"(generation {record.generation}); instances follow at their next poll")
            return
        _print_report(Promoter(settings, store, progress=_progress).rollback(settings.collection))
    except SemsearchError as exc:
        raise fail(str(exc), exit_code(exc)) from exc
    finally:
        store.close()

def gc(
    milvus_uri: MilvusUriOption = None,
    config: ConfigOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Drop them (default: only list)")] = False,
) -> None:
    """List (or drop, with --yes) collections no registry pointer or alias references."""
    settings = settings_from_cli(config, milvus_uri=milvus_uri)
    store = _store(settings)
    try:
        garbage = Promoter(settings, store).gc(dry_run=not yes)
    finally:
        store.close()
    verb = "dropped" if yes else "unreferenced (drop with --yes)"
    typer.echo(f"{len(garbage)} collections {verb}" + "".join(f"\n  {name}" for name in garbage))


@dataclass(frozen=True)
class _GateSpec:
    """What `promote` gates a candidate model on (or that it skips the gate)."""

    eval_data: Path | None
    force: bool
    metric: str
    min_improvement: float
    guards: dict[str, float]


def _promote_model(settings: Settings, promoter: Promoter, candidate: str, encoder_url: str | None,
                   spec: _GateSpec) -> PromotionReport:
    def run_gate(current: PairRecord) -> dict[str, Any]:
        if spec.force:
            console.print("[yellow]gate skipped (--force); recorded in the registry[/yellow]")
            return GateResult(passed=True, metric=spec.metric, current={}, candidate={}, forced=True).metrics()
        assert spec.eval_data is not None
        result = gate(current, candidate, spec.eval_data, settings, metric=spec.metric,
                      min_improvement=spec.min_improvement, guards=spec.guards)
        console.print(result.table())
        if not result.passed:
            for reason in result.reasons:
                console.print(f"[red]gate failed:[/red] {reason}")
            raise typer.Exit(EXIT_REFUSED)  # the gate refused: nothing changed
        return result.metrics()

    encoder = create_encoder(settings.model_copy(update={"model": candidate, "encoder_url": encoder_url}))
    try:
        return promoter.promote(settings.collection, encoder, run_gate, encoder_url=encoder_url)
    finally:
        encoder.close()


def register(app: typer.Typer) -> None:
    for command in (promote, rollback, gc):
        app.command()(command)


def _promote_reranker(settings: Settings, promoter: Promoter, candidate_ref: str, url: str | None,
                      eval_data: Path | None, *, force: bool, metric: str, min_improvement: float,
                      guards: dict[str, float], candidates: int) -> None:
    """Gate the candidate reranker against the serving one on the held-out rows (retrieval through
    the serving encoder, then each reranker over the same candidates) and record it: every
    instance swaps it in at its next poll; nothing is re-embedded."""
    from semsearch.registry import RerankerRecord, open_pair_encoder, open_record_reranker
    from semsearch.rerankers import create_reranker
    from trainer.rerank_gate import rerank_gate
    from trainer.rows import read_rows

    name = settings.collection
    record = promoter.registry.get(name)
    if record is None or record.current is None:
        raise fail(f"no registry record for {name!r}: start the service (or promote a model) first")
    candidate = create_reranker(settings, candidate_ref, url)
    assert candidate is not None
    current = None
    try:
        if force:
            console.print("[yellow]gate skipped (--force); recorded in the registry[/yellow]")
            metrics = GateResult(passed=True, metric=metric, current={}, candidate={}, forced=True).metrics()
        else:
            assert eval_data is not None
            if record.reranker is not None:
                current = open_record_reranker(record.reranker, settings)
            encoder = open_pair_encoder(record.current, settings)
            try:
                result = rerank_gate(read_rows(eval_data), encoder, current, candidate, metric=metric,
                                     min_improvement=min_improvement, guards=guards, candidates=candidates)
            finally:
                encoder.close()
            console.print(f"current: {current.manifest.version if current else 'no reranker (retrieval alone)'}; "
                          f"candidate: {candidate.manifest.version}; top {candidates} retrieved by "
                          f"{record.current.model_version}")
            console.print(result.table())
            if not result.passed:
                for reason in result.reasons:
                    console.print(f"[red]gate failed:[/red] {reason}")
                raise typer.Exit(EXIT_REFUSED)  # the gate refused: nothing changed
            metrics = result.metrics()
        manifest = candidate.manifest
        updated = promoter.registry.set_reranker(name, RerankerRecord(
            version=manifest.version, manifest=json.loads(manifest.model_dump_json()), url=url, metrics=metrics))
        console.print(f"{name}: reranker {manifest.version} (generation {updated.generation}); "
                      "instances swap it in at their next poll (or AdminService.ReloadServingState)")
    finally:
        candidate.close()
        if current is not None:
            current.close()


def _resuming(promoter: Promoter, name: str) -> bool:
    """A promotion is pending: re-running completes it without the gate (it passed already)."""
    record = promoter.registry.get(name)
    return record is not None and record.pending is not None


def _parse_guard(spec: str) -> tuple[str, float]:
    name, _, tolerance = spec.partition("=")
    try:
        return name.strip(), float(tolerance)
    except ValueError:
        raise typer.BadParameter(f"--guard {spec!r}: use METRIC=TOLERANCE, e.g. mrr@10=0.02") from None
