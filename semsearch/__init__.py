from semsearch import logs as _logs  # noqa: F401  (structured logging defaults)
