"""A registry of named entries (editing methods, attribution methods, ...) that refuses
duplicate names.

Each kind of pluggable thing keeps one :class:`Registry` of its entries; a module registers
its entry where the entry is defined, and the runner looks entries up by the name the user
gave, so adding a method never means editing the runner (SAELens' ``registry.py``).  An
unknown name is a :class:`~mlake_core.errors.ConfigError` that names the option and lists
the known names, so the command line reports it without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from mlake_core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    Args:
        kind: what an entry is, for messages (``"edit method"``).
        option: the command-line option that names an entry (``"--method"``); when given,
            an unknown name reads ``"--method 'x' is not known; choose from ..."``, otherwise
            ``"unknown edit method 'x'; choose from ..."``.
    """

    def __init__(self, kind: str, *, option: str | None = None) -> None:
        self.kind = kind
        self.option = option
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` and return it.

        Raises:
            ValueError: ``name`` is already registered (a programming error, not a user's).
        """
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry registered under ``name``.

        Raises:
            ConfigError: an unknown name, naming the option and listing the known names.
        """
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            if self.option is not None:
                message = f"{self.option} {name!r} is not known; choose from {known}"
            else:
                message = f"unknown {self.kind} {name!r}; choose from {known}"
            raise ConfigError(message) from None

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def entries(self) -> tuple[T, ...]:
        """The registered entries, in registration order."""
        return tuple(self._entries.values())

    def copy(self) -> Registry[T]:
        """A registry with the same entries (for tests that register a double)."""
        other: Registry[T] = Registry(self.kind, option=self.option)
        other._entries = dict(self._entries)
        return other

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
