"""``key=value`` command-line arguments, typed: what every ``stepdistill`` command and bench suite parses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stepdistill.errors import StepdistillError


def parse_args(overrides: Sequence[str], keys: dict[str, str], command: str) -> dict[str, Any]:
    """``key=value`` arguments typed by ``keys`` (str, int, bool, ints); a one-line error otherwise."""
    args: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in keys:
            raise StepdistillError(f"unknown key {key!r} for `stepdistill {command}`; allowed: {', '.join(keys)}")
        kind = keys[key]
        try:
            if kind == "int":
                args[key] = int(value)
            elif kind == "bool":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                args[key] = value.lower() in ("true", "1", "yes")
            elif kind == "ints":
                args[key] = [int(v) for v in value.strip("[]").split(",") if v.strip()]
            else:
                args[key] = value
        except ValueError:
            raise StepdistillError(f"{key}={value!r} is not a valid {kind.rstrip('s')}"
                                   f"{' list' if kind == 'ints' else ''}") from None
    return args
