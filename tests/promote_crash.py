"""Test-only: `semsearch` with a process kill at one step of a promotion (never shipped).

    SEMSEARCH_TEST_CRASH_AFTER=<step> python -m tests.promote_crash promote ...

kills the process (os._exit, like kill -9: no cleanup, no finally) right after the step completes:
pending (pending pair recorded), copy (full re-embed), replay (replay + orphan removal), validate,
registry (the swap's registry write) or swap (the alias moved). The fault points wrap the
production functions from outside, so production code carries no test hook.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import semsearch.promotion as promotion
from semsearch.cli import main
from semsearch.registry import ModelRegistry, RegistryRecord
from semsearch.store import MilvusStore

STEPS = ("pending", "copy", "replay", "validate", "registry", "swap")


def crash(step: str) -> None:
    print(f"crash injected after {step}", file=sys.stderr, flush=True)
    os._exit(137)


def after(step: str, original: Callable[..., Any], when: Callable[..., bool] = lambda *a, **k: True) -> Any:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if when(result, *args, **kwargs):
            crash(step)
        return result

    return wrapper


def last_event(record: RegistryRecord) -> str:
    return str(record.history[-1]["event"]) if record.history else ""


def install(step: str) -> None:
    if step not in STEPS:
        raise SystemExit(f"SEMSEARCH_TEST_CRASH_AFTER must be one of {STEPS}, not {step!r}")
    if step == "pending":
        ModelRegistry.put = after(step, ModelRegistry.put,  # type: ignore[method-assign]
                                  lambda record, *a, **k: last_event(record).endswith("_started"))
    elif step == "copy":
        promotion.copy_rows = after(step, promotion.copy_rows, lambda _, *a, **k: k.get("since_ms") is None)
    elif step == "replay":
        promotion.remove_orphans = after(step, promotion.remove_orphans)
    elif step == "validate":
        promotion.validate = after(step, promotion.validate, lambda check, *a, **k: check.ok)
    elif step == "registry":
        ModelRegistry.put = after(step, ModelRegistry.put,  # type: ignore[method-assign]
                                  lambda record, *a, **k: last_event(record).endswith("_swapped"))
    else:
        MilvusStore.point_alias = after(step, MilvusStore.point_alias)  # type: ignore[method-assign]


if __name__ == "__main__":
    install(os.environ["SEMSEARCH_TEST_CRASH_AFTER"])
    main()
