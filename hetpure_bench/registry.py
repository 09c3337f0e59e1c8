"""Name -> constructor registries with metadata kept as data (the timm / RobustBench pattern)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing: how to build it, what it is, and whether it can be built offline now."""

    name: str
    build: Callable[..., T]
    info: dict[str, Any] = field(default_factory=dict)
    available: Callable[[], bool] = _always


class Registry(Generic[T]):
    """A named collection of entries of one kind ("classifier", "diffusion model", ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, build: Callable[..., T], *, available: Callable[[], bool] = _always, **info: Any
    ) -> Entry[T]:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        entry = Entry(name, build, dict(info), available)
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            close = self.suggest(name)
            hint = f"; did you mean {close!r}?" if close else ""
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (known: {known})") from None

    def suggest(self, name: str) -> str | None:
        """The registered name closest to ``name`` (containing it, else by spelling), if any."""
        key = "".join(ch for ch in name.lower() if ch.isalnum())
        containing = [n for n in self.names() if key and key in "".join(c for c in n.lower() if c.isalnum())]
        close = containing or difflib.get_close_matches(name, self.names(), n=1, cutoff=0.6)
        return close[0] if close else None

    def build(self, name: str, **kwargs: Any) -> T:
        return self.get(name).build(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[name] for name in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries
