"""`python -m indexer ARGS` is `semsearch index ARGS` (handy in containers and tests)."""

from __future__ import annotations

import sys

import typer

from indexer.cli import register


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app(args=["index", *sys.argv[1:]], prog_name="python -m indexer")


if __name__ == "__main__":
    main()
