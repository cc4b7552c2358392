"""A name -> constructor registry so configs can say ``model: {name: iunet, ...}`` (timm style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "get_model_class"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

T = TypeVar("T", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[T], T]:
    """Class/function decorator registering a model constructor under ``name`` (lower case).

    Re-registering the same constructor (same module and qualified name, e.g. after a module
    reload) replaces the entry.

    Raises:
        ValueError: when ``name`` is empty, not lower case, or already registered to another
            constructor.
    """
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"model name must be a non-empty lower-case string, got {name!r}")

    def decorator(constructor: T) -> T:
        existing = _REGISTRY.get(name)
        same = existing is not None and (existing.__module__, existing.__qualname__) == (
            constructor.__module__,
            constructor.__qualname__,
        )
        if existing is not None and not same:
            raise ValueError(f"model name {name!r} is already registered to {existing.__qualname__}")
        _REGISTRY[name] = constructor
        return constructor

    return decorator


def get_model_class(name: str) -> Callable[..., nn.Module]:
    """The constructor registered under ``name``; ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(list_models()) or '(none)'}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered under ``name`` with keyword arguments ``kwargs``.

    Raises:
        ValueError: for an unknown ``name`` (the message lists the known names), or from the
            model's own argument validation.
    """
    return get_model_class(name)(**kwargs)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)
