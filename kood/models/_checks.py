"""Argument checks shared by the architecture builders."""

from __future__ import annotations

from kood.errors import ConfigError


def check_int(arch: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{arch}: `{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    return value


def check_rate(arch: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{arch}: `{name}` must be a number in [0, 1). Received: {name}={value!r}")
    return float(value)


def check_choice(arch: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ConfigError(f"{arch}: `{name}` must be one of {list(choices)}. Received: {name}={value!r}")
    return value
