"""Reading the services' TOML configuration files into checked values.

Each service describes its file as a dataclass; these helpers load the file and
turn a missing or mistyped field into a ConfigError that names it.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from moat.errors import ConfigError

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(str(path), "file", exc.strerror or str(exc)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "syntax", str(exc)) from exc


class Section:
    """A table of a config file; getters check types and name the field."""

    def __init__(self, source: str, prefix: str, table: dict[str, Any]) -> None:
        self.source = source
        self.prefix = prefix
        self.table = table

    def _field(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self._field(key), problem)

    def get(self, key: str, kind: type[T], default: T | None = None) -> T:
        if key not in self.table:
            if default is None:
                raise self.error(key, "missing")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"must be {kind.__name__}, not {value!r}")
        return value

    def number(
        self, key: str, default: float, low: float = 0, high: float = float("inf")
    ) -> float:
        value = self.get(key, float, float(default))
        if not low <= value <= high:
            raise self.error(key, f"must be in [{low}, {high}], not {value}")
        return value

    def port(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if not 0 < value < 65536:
            raise self.error(key, f"not a port: {value}")
        return value

    def address(self, key: str, default: str | None = None) -> str:
        value = self.get(key, str, default)
        return self._check_address(key, value)

    def addresses(self, key: str, default: list[str] | None = None) -> list[str]:
        values = self.get(key, list, default)
        return [self._check_address(key, str(v)) for v in values]

    def _check_address(self, key: str, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError as exc:
            raise self.error(key, f"not an IP address: {value!r}") from exc

    def sub(self, key: str) -> Section:
        table = self.get(key, dict, {})
        return Section(self.source, f"{self._field(key)}.", table)

    def subs(self, key: str) -> list[Section]:
        tables = self.get(key, list, [])
        out = []
        for i, table in enumerate(tables):
            if not isinstance(table, dict):
                raise self.error(f"{key}[{i}]", "must be a table")
            out.append(Section(self.source, f"{self._field(key)}[{i}].", table))
        return out


def read_section(path: str | Path) -> Section:
    return Section(str(path), "", load_toml(path))
