"""The method registry: a name -> :class:`~pbip_engine.methods.base.Method` table (timm's ``register_model``).

Adding a method is one folder under ``methods/`` plus one import line in ``methods/__init__.py``; tests
register toy methods at run time. The spec builds its ``method:`` union from this table when it parses.
"""

from __future__ import annotations

from pbip_engine.methods.base import Method

METHODS: dict[str, Method] = {}
_version = [0]  # bumped on every change, so the spec's cached union knows when to rebuild


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (a second name clash is an error)."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no name")
    if name in METHODS and type(METHODS[name]) is not cls:
        raise ValueError(f"method {name!r} is already registered by {type(METHODS[name]).__name__}")
    fields = cls.config_model.model_fields
    if "name" not in fields or fields["name"].annotation is str:
        raise ValueError(f"{cls.__name__}.config_model must declare name: Literal[{name!r}]")
    METHODS[name] = cls()
    _version[0] += 1
    return cls


def unregister_method(name: str) -> None:
    """Remove a method (tests that register toy methods clean up with this)."""
    if METHODS.pop(name, None) is not None:
        _version[0] += 1


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; methods are {sorted(METHODS)}")
    return METHODS[name]


def registry_version() -> int:
    return _version[0]
