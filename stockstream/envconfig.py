"""Typed configuration from environment variables: the mechanism behind settings.py.

A setting is a dataclass field declared with `var(NAME, default, check, why)`. `build` fills a
tree of such dataclasses from a mapping of variable names to text, converting each value to
its field's type (int, float, bool, Path, Literal choices, comma-separated tuples, `Secret`),
reading `<NAME>_FILE` instead when given (docker secrets), and refusing a bad value with a
`SettingsError` that names the variable and never shows a secret. `layered` merges the sources
in precedence order: the process environment, a `.env` file, a YAML profile.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import yaml
from dotenv import dotenv_values

from stockstream.errors import StockstreamError


class SettingsError(StockstreamError, ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


Check = Callable[[Any], bool]


def var(env: str, default: Any, check: Check | None = None, why: str = "") -> Any:
    """Declare a dataclass field read from environment variable `env`."""
    return field(default=default, metadata={"env": env, "check": check, "why": why})


def _convert(name: str, raw: str, kind: Any, secret: bool) -> Any:
    shown = "<secret>" if secret else repr(raw)
    if isinstance(kind, types.UnionType):  # `X | None`: an empty value already means None
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    origin = get_origin(kind)
    if origin is Literal:
        choices = get_args(kind)
        value = raw.strip()
        # Levels are conventionally upper case, formats and guarantees lower case.
        for choice in choices:
            if value.lower() == str(choice).lower():
                return choice
        raise SettingsError(f"{name}: must be one of {', '.join(choices)}, got {shown}")
    if kind is Secret:
        return Secret(raw.strip())
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name}: expected a boolean (true/false), got {shown}")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}: expected an integer, got {shown}") from None
    if kind is float:
        try:
            value_f = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}: expected a number, got {shown}") from None
        if value_f != value_f or value_f in (float("inf"), float("-inf")):
            raise SettingsError(f"{name}: expected a finite number, got {shown}")
        return value_f
    if kind is Path:
        return Path(raw.strip())
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw.strip()


def _read_file_value(name: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        # The path is not secret, the content is: name the path, never the content.
        raise SettingsError(f"{name}_FILE: cannot read {path!r}: {exc.strerror}") from None


def build(cls: type[Any], values: Mapping[str, str]) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = build(kind, values)  # type: ignore[arg-type]
            continue
        name = f.metadata["env"]
        secret = kind is Secret
        raw: str | None
        if values.get(f"{name}_FILE"):
            raw = _read_file_value(name, values[f"{name}_FILE"])
        else:
            raw = values.get(name)
        if raw is None or (raw == "" and not secret):
            continue
        value = _convert(name, raw, kind, secret)
        check: Check | None = f.metadata["check"]
        if check is not None and not check(value):
            shown = "<secret>" if secret else repr(raw)
            raise SettingsError(f"{name}: {f.metadata['why']}, got {shown}")
        kwargs[f.name] = value
    return cls(**kwargs)


def profile_values(config_dir: Path, env: str, explicit: bool) -> dict[str, str]:
    path = config_dir / f"{env}.yml"
    if not path.exists():
        if explicit and env != "dev":
            raise SettingsError(f"STOCKSTREAM_ENV: profile {path} not found")
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"STOCKSTREAM_ENV: profile {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise SettingsError(f"STOCKSTREAM_ENV: profile {path} must be a mapping of VARIABLE: value")
    return {str(k): "" if v is None else str(v) for k, v in loaded.items()}


def environment(
    environ: Mapping[str, str] | None, dotenv_path: str | Path | None
) -> dict[str, str]:
    """The process environment (or `environ`) over the `.env` file, if there is one."""
    process_env = dict(os.environ if environ is None else environ)
    dotenv: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).exists():
        dotenv = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
    return {**dotenv, **process_env}


def documented_variables(root: type[Any]) -> list[tuple[str, str]]:
    """(variable, default) for every setting of the dataclass tree `root`."""
    rows: list[tuple[str, str]] = []

    def walk(cls: type[Any]) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])  # type: ignore[arg-type]
                continue
            default = f.default
            if isinstance(default, Secret) or default is None:
                shown = ""
            elif isinstance(default, tuple):
                shown = ",".join(default)
            else:
                shown = str(default)
            rows.append((f.metadata["env"], shown))

    walk(root)
    return rows


def secret_variables(root: type[Any]) -> list[str]:
    """The variables of every `Secret` setting of the dataclass tree `root`."""
    names: list[str] = []

    def walk(cls: type[Any]) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])  # type: ignore[arg-type]
            elif hints[f.name] is Secret:
                names.append(f.metadata["env"])

    walk(root)
    return names


def redact_url(text: str) -> str:
    """`text` with a URL's password and query values masked (settings such as
    FINNHUB_WS_URL or an endpoint may carry a token); anything else unchanged."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
        elif parts.username is not None and "@" in netloc:
            # A lone userinfo is often a token (`https://TOKEN@host`).
            netloc = "***@" + netloc.split("@", 1)[1]
        query = "&".join(f"{k}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "***"
