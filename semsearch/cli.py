"""The `semsearch` command. Each package (service, indexer, trainer) adds its own subcommands through
the `semsearch.cli` entry-point group, so this library never imports them."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_errors  # typer vendors click and re-exports only BadParameter
from typer.core import TyperGroup

from semsearch.config import Settings, load_settings
from semsearch.logs import configure_logging

# Exit codes: 1 = the command failed (unreachable service, refused key, model mismatch...),
# 2 = bad usage or settings (a flag, a variable, the YAML file), 3 = refused: the command ran and
# declined to change anything (a failed promotion gate, a validation that found divergence, another
# writer won the race); nothing is broken and re-running after fixing the cause may succeed.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


def usage_message(exc: click_errors.UsageError) -> str:
    """One line for a usage error: the flag, the closest valid one, and where the help is."""
    if isinstance(exc, click_errors.NoSuchOption):
        message = f"no such option {exc.option_name}"
        if exc.possibilities:
            message += f" (did you mean {' or '.join(exc.possibilities)}?)"
    else:
        message = one_line(exc.format_message()).rstrip(".")
    if exc.ctx is not None:
        message += f"; see `{exc.ctx.command_path} --help`"
    return message


class SemsearchGroup(TyperGroup):
    """The root group: click's usage errors (a misspelt flag, a value of the wrong type, a missing
    argument) become one `error:` line and exit 2 in every command, instead of typer's usage block
    and box; typer only offers to turn that box off, not to shorten it."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, windows_expand_args, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # `semsearch train` alone: the help, as before
            exc.show()
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:  # NoSuchOption, BadParameter, MissingParameter, NoSuchCommand
            typer.secho(f"error: {usage_message(exc)}", err=True, fg=typer.colors.RED)
            sys.exit(EXIT_USAGE)
        except click_errors.ClickException as exc:  # FileError and the like
            typer.secho(f"error: {one_line(exc.format_message())}", err=True, fg=typer.colors.RED)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(EXIT_FAILED)
        # Without standalone mode click returns the exit code of a typer.Exit, or the command's value.
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="semsearch", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    cls=SemsearchGroup, context_settings={"help_option_names": ["-h", "--help"]},
    help="Chinese semantic search: serve, index, search, train and promote embedding models.",
)


def env_hint(setting: str) -> str:
    """` [env SEMSEARCH_<SETTING>]` for a help text; escaped, or Rich markup would swallow it as a tag."""
    return f" \\[env SEMSEARCH_{setting.upper()}]"


# The same names for the same settings in every command; each is also SEMSEARCH_<NAME> in the
# environment and <name> in the YAML file given by --config (SEMSEARCH_CONFIG).
ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML settings file" + env_hint("config"))]
MilvusUriOption = Annotated[str | None, typer.Option(
    "--milvus-uri", help="Milvus Lite directory (*.db) or http://host:19530" + env_hint("milvus_uri"))]
CollectionOption = Annotated[str | None, typer.Option(
    "--collection", help="Collection or alias name" + env_hint("collection"))]
ModelOption = Annotated[str | None, typer.Option(
    "--model", help="Local model directory or hub id" + env_hint("model"))]
EncoderUrlOption = Annotated[str | None, typer.Option(
    "--encoder-url", help="Remote embedding server URL(s), comma-separated" + env_hint("encoder_url"))]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda[:N]" + env_hint("device"))]
EncoderBackendOption = Annotated[str | None, typer.Option(
    "--encoder-backend", help="In-process encoder: torch, onnx, onnx-int8 or auto" + env_hint("encoder_backend"))]
HostOption = Annotated[str | None, typer.Option("--host", help="Address the service binds" + env_hint("host"))]
PortOption = Annotated[int | None, typer.Option("--port", help="gRPC port" + env_hint("port"))]
LogLevelOption = Annotated[str | None, typer.Option(
    "--log-level", help="DEBUG, INFO, WARNING" + env_hint("log_level"))]

def settings_from_cli(config: Path | None = None, **flags: Any) -> Settings:
    """Settings with CLI flags on top; exits with a one-line message on a bad file or value."""
    try:
        settings = load_settings(config, **flags)
    except (OSError, ValueError) as exc:
        raise fail(str(exc), EXIT_USAGE) from exc
    configure_logging(settings.log_level, settings.log_json or None)
    return settings


def one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print `error: <message>` on one line of stderr; `raise fail(...)` exits with `code`."""
    typer.secho(f"error: {one_line(message)}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def package_version() -> str:
    try:
        return version("semsearch")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"semsearch {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit", callback=_show_version, is_eager=True)] = False,
) -> None:
    """Chinese semantic search: serve, index, search, train and promote embedding models."""


def _load_plugins() -> None:
    from semsearch import transfer  # the library's own commands (export / import); imports this module

    transfer.register(app)
    for entry in sorted(entry_points(group="semsearch.cli"), key=lambda e: e.name):
        entry.load()(app)


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # answer before importing every command's dependencies
        typer.echo(f"semsearch {package_version()}")
        return
    _load_plugins()
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback on request
        if os.environ.get("SEMSEARCH_TRACEBACK"):
            traceback.print_exc()
        else:
            typer.echo(f"error: {type(exc).__name__}: {one_line(str(exc))} "
                       "(set SEMSEARCH_TRACEBACK=1 to see the traceback)", err=True)
        sys.exit(EXIT_FAILED)
