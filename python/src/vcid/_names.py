"""The naming rules of run ids and stream names (split, layer), checked in
the client before anything is sent. Owns the length limits and the allowed
characters, in one place; must not know where the names are used."""

from __future__ import annotations

import re
from typing import Any, Optional

from ._errors import ArgumentError

#: Longest run id, in characters.
RUN_ID_MAX_LEN = 128
#: Longest split or layer name, in characters.
STREAM_NAME_MAX_LEN = 64
#: The characters a run id, split or layer may use (a regex character class).
NAME_CHARS = "A-Za-z0-9_.:-"

_NAME_RE = re.compile(f"^[{NAME_CHARS}]+$")


def _check_name(argument: str, value: Any, max_len: int) -> str:
    """1..max_len characters of ``NAME_CHARS``."""
    if not isinstance(value, str):
        raise ArgumentError(
            argument, f"expected a string of 1-{max_len} characters of [{NAME_CHARS}], "
            f"received {type(value).__name__} {value!r}")
    if not (1 <= len(value) <= max_len) or not _NAME_RE.match(value):
        raise ArgumentError(
            argument, f"expected 1-{max_len} characters of [{NAME_CHARS}], received {value!r}")
    return value


def check_run_id(value: Any, argument: str = "run") -> str:
    """A run id: 1-128 characters of ``[A-Za-z0-9_.:-]``."""
    return _check_name(argument, value, RUN_ID_MAX_LEN)


def check_stream_name(argument: str, value: Any) -> str:
    """A split or layer name: 1-64 characters of ``[A-Za-z0-9_.:-]``."""
    return _check_name(argument, value, STREAM_NAME_MAX_LEN)


def check_stream_filter(argument: str, value: Optional[Any]) -> str:
    """A split or layer filter: a name, or None for all (sent as ``""``)."""
    return "" if value is None else check_stream_name(argument, value)
