"""`keep_alive` durations: parse what an operator writes, format it back.

Accepted forms (the catalogue's `keep_alive`):

- an integer or float number of seconds: `300`, `0` (unload as soon as idle), `-1` (never unload);
- a string of number+unit parts, largest first by convention: `"30m"`, `"1h30m"`, `"45s"`, `"1.5h"`,
  `"500ms"`, `"2d"`; units `d`, `h`, `m`, `s`, `ms`; `"0"`, `"-1"` and bare digits (seconds) too.

`None` stands for "never" in the parsed form (`ModelEntry.keep_alive_s`), because "never" is not a number
of seconds. `format_keep_alive(parse_keep_alive(x))` is a canonical spelling and
`parse_keep_alive(format_keep_alive(s)) == s` for every value `parse_keep_alive` can return.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_keep_alive", "parse_keep_alive"]

_UNIT_S: dict[str, int] = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_keep_alive(value: object) -> float | None:
    """Seconds of idle time before unloading, or None for "never". Raises ValueError with a message
    that says what is accepted (the validator puts it into a `Problem`)."""
    if isinstance(value, bool):
        raise ValueError('must be a duration such as "30m", a number of seconds, 0 or -1')
    if isinstance(value, int):
        if value == -1:
            return None
        if value < 0:
            raise ValueError("must be >= 0 seconds, or -1 for never")
        return float(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        if value == -1.0:
            return None
        if value < 0:
            raise ValueError("must be >= 0 seconds, or -1 for never")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text == "-1":
            return None
        if _NUMBER.fullmatch(text):
            return float(text)
        if _WHOLE.fullmatch(text):
            return _sum_parts(text)
    raise ValueError('must be a duration such as "30m", "1h30m", "45s", a number of seconds, 0 or -1')


def _sum_parts(text: str) -> float:
    whole = 0  # exact integer seconds while every part is whole
    fraction = 0.0
    for number, unit in _PART.findall(text):
        if unit == "ms":
            fraction += float(number) / 1000.0
        elif "." in number:
            fraction += float(number) * _UNIT_S[unit]
        else:
            whole += int(number) * _UNIT_S[unit]
    return float(whole) + fraction if fraction else float(whole)


def format_keep_alive(seconds: float | None) -> str | int | float:
    """The canonical TOML/JSON value for `seconds`: -1 for never, 0 for at once, `"1h30m"` for whole
    seconds, the float itself otherwise (so the round trip is exact)."""
    if seconds is None:
        return -1
    if seconds == 0:
        return 0
    if not seconds.is_integer():
        return seconds
    rest = int(seconds)
    parts: list[str] = []
    for unit in ("h", "m", "s"):
        count, rest = divmod(rest, _UNIT_S[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
