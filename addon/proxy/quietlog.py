"""Repeated log lines once per interval, with a count: a journal that is down for an hour must not
write the same connection error every second."""

from __future__ import annotations

import logging
import time


class OncePerInterval(logging.Filter):
    """Each message (by its format string) at most once per `interval_s`; the next one that passes
    says how many like it were held back."""

    def __init__(self, interval_s: float = 30) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        last, held = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._seen[key] = (last, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {now - last:.0f}s)"
        return True


def quiet(*loggers: str, interval_s: float = 30) -> None:
    for name in loggers:
        target = logging.getLogger(name)
        if not any(isinstance(f, OncePerInterval) for f in target.filters):
            target.addFilter(OncePerInterval(interval_s))
