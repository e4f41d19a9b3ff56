"""The agent's logging: plain lines, colour only on a terminal, syslog priority prefixes under journald;
and the one "log once, then quietly" helper.

Handlers are configured only here, by the entry point (`mesh.process.main`); every module logs through
`logging.getLogger(__name__)` with lazy %-style arguments. A condition that repeats (a peer that keeps
failing, a stranger without the mesh key retrying every second, a flapping peer) is logged once at
warning, then at debug (`QuietLog`, after zeroconf's `QuietLogger`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

__all__ = ["QuietLog", "configure_logging"]

# Keys a `QuietLog` remembers before it forgets them all (memory stays bounded whatever a stranger sends;
# at worst a warning is repeated).
QUIET_LOG_MAX_KEYS = 4096


class QuietLog:
    """Decides the level of a repeated message: `level` the first time for a key, debug after that.

    With `quiet_s` the key is loud again once that long has passed since its last loud message (a peer
    that flaps once a day is reported each time); without, it stays quiet until `reset(key)` (the
    condition ended: the next failure is news again).
    """

    def __init__(
        self,
        *,
        level: int = logging.WARNING,
        quiet_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loud_level = level
        self.quiet_s = quiet_s
        self._clock = clock
        self._loud_at: dict[Hashable, float] = {}

    def level(self, key: Hashable) -> int:
        """The level to log `key`'s message at now (remembering a loud one)."""
        now = self._clock()
        last = self._loud_at.get(key)
        if last is not None and (self.quiet_s is None or now - last < self.quiet_s):
            return logging.DEBUG
        if len(self._loud_at) >= QUIET_LOG_MAX_KEYS:
            self._loud_at.clear()
        self._loud_at[key] = now
        return self.loud_level

    def reset(self, key: Hashable) -> None:
        """The condition behind `key` ended: its next message is loud again."""
        self._loud_at.pop(key, None)


# syslog priorities (what journald reads from a `<N>` line prefix) of the logging levels.
_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class _Formatter(logging.Formatter):
    """Plain lines; colours only on a terminal; syslog priority prefixes under journald.

    Under systemd (stderr is the journal stream) each line starts with `<N>` (journald's
    `SyslogLevelPrefix`) so `journalctl -p warning` filters by level, and carries no timestamp (the
    journal records its own). Elsewhere: `time LEVEL logger: message`, coloured only on a terminal.
    """

    COLOURS = {"DEBUG": "\033[2m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[1;31m"}

    def __init__(self, *, colour: bool, journald: bool = False) -> None:
        fmt = (
            "%(levelname)s %(name)s: %(message)s"
            if journald
            else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        super().__init__(fmt)
        self.colour = colour and not journald
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            # One journal entry per line: a traceback's lines would each become an entry of their own.
            return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>" + text.replace("\n", "\n    ")
        if self.colour and record.levelname in self.COLOURS:
            return f"{self.COLOURS[record.levelname]}{text}\033[0m"
        return text


def _is_journal(stream: Any, environ: Mapping[str, str]) -> bool:
    """True when `stream` is systemd's journal stream (`JOURNAL_STREAM` names its device and inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure_logging(level: str, *, stream: Any = None, environ: Mapping[str, str] | None = None) -> None:
    """The agent's logging: one handler on the root logger, level from the config (`--log-level`,
    `HELEXA_LOG_LEVEL`). Colour only on a terminal (and never with `NO_COLOR`); journald gets priority
    prefixes instead (see `_Formatter`)."""
    env = os.environ if environ is None else environ
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    journald = _is_journal(out, env)
    colour = bool(getattr(out, "isatty", lambda: False)()) and not env.get("NO_COLOR") and not journald
    handler.setFormatter(_Formatter(colour=colour, journald=journald))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log is off (access_log=None); keep its other chatter at warning unless debugging.
    logging.getLogger("aiohttp").setLevel(logging.WARNING if level != "debug" else logging.NOTSET)
