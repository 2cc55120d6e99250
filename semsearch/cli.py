"""The `semsearch` command. Each package (service, indexer, trainer) adds its own subcommands through
the `semsearch.cli` entry-point group, so this library never imports them."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer

from semsearch.config import Settings, load_settings
from semsearch.logs import configure_logging

app = typer.Typer(
    name="semsearch", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Chinese semantic search: serve, index, search, train and promote embedding models.",
)

# The same names for the same settings in every command; each is also SEMSEARCH_<NAME> in the
# environment and <name> in the YAML file given by --config (SEMSEARCH_CONFIG).
ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML settings file [env SEMSEARCH_CONFIG]")]
MilvusUriOption = Annotated[str | None, typer.Option(
    "--milvus-uri", help="Milvus Lite directory (*.db) or http://host:19530 [env SEMSEARCH_MILVUS_URI]")]
CollectionOption = Annotated[str | None, typer.Option(
    "--collection", help="Collection or alias name [env SEMSEARCH_COLLECTION]")]
ModelOption = Annotated[str | None, typer.Option(
    "--model", help="Local model directory or hub id [env SEMSEARCH_MODEL]")]
EncoderUrlOption = Annotated[str | None, typer.Option(
    "--encoder-url", help="Remote embedding server URL(s), comma-separated [env SEMSEARCH_ENCODER_URL]")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda[:N] [env SEMSEARCH_DEVICE]")]
EncoderBackendOption = Annotated[str | None, typer.Option(
    "--encoder-backend", help="In-process encoder: torch, onnx, onnx-int8 or auto [env SEMSEARCH_ENCODER_BACKEND]")]
HostOption = Annotated[str | None, typer.Option("--host", help="Bind address [env SEMSEARCH_HOST]")]
PortOption = Annotated[int | None, typer.Option("--port", help="gRPC port [env SEMSEARCH_PORT]")]
LogLevelOption = Annotated[str | None, typer.Option(
    "--log-level", help="DEBUG, INFO, WARNING [env SEMSEARCH_LOG_LEVEL]")]


def settings_from_cli(config: Path | None = None, **flags: Any) -> Settings:
    """Settings with CLI flags on top; exits with a clear message on a bad file or value."""
    try:
        settings = load_settings(config, **flags)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level, settings.log_json or None)
    return settings


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _load_plugins() -> None:
    for entry in sorted(entry_points(group="semsearch.cli"), key=lambda e: e.name):
        entry.load()(app)


def main() -> None:
    _load_plugins()
    app()
