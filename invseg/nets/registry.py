"""A name -> constructor registry so configs can say ``model: {name: iunet, kwargs: {...}}`` (timm style)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "get_model_class", "model_arguments", "check_model_kwargs"]

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


def model_arguments(name: str) -> tuple[list[str], list[str], bool]:
    """Keyword arguments of the constructor registered under ``name``.

    Returns:
        ``(accepted, required, any_keyword)``: the names it accepts (in signature order), those without a
        default, and whether it also takes ``**kwargs`` (then every name is accepted).
    """
    params = inspect.signature(get_model_class(name)).parameters.values()
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is inspect.Parameter.empty]
    return accepted, required, any(p.kind is p.VAR_KEYWORD for p in params)


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], *, key: str = "model.kwargs", where: str = "",
                       provided: Iterable[str] = ()) -> None:
    """Check a config's ``{name, kwargs}`` against the signature of the registered constructor.

    Args:
        name: registry name (``model.name``).
        kwargs: the constructor's keyword arguments from the config (``model.kwargs``).
        key: dotted config key of ``kwargs``, named in the messages. Default ``"model.kwargs"``.
        where: prefix of the messages, e.g. ``"config file configs/x.yaml"``; empty: none.
        provided: arguments the caller fills in itself (e.g. ``in_channels`` from the data): they must not
            appear in ``kwargs`` and do not count as missing.

    Raises:
        ValueError: an unknown ``name`` (listing the known ones); a key the constructor does not take
            (naming it, the closest accepted name and every accepted name); a key of ``provided``; or a
            required argument that is missing.
    """
    prefix = f"{where}: " if where else ""
    try:
        accepted, required, any_keyword = model_arguments(name)
    except ValueError as err:
        raise ValueError(f"{prefix}{key.rsplit('.', 1)[0]}.name: {err}") from None
    provided = tuple(provided)
    options = [a for a in accepted if a not in provided]
    for k in kwargs:
        if k in provided:
            raise ValueError(f"{prefix}key '{key}.{k}' is set by the trainer for model {name!r} (from the data); "
                             "remove it from the config")
        if k not in accepted and not any_keyword:
            close = difflib.get_close_matches(str(k), options, n=1)
            hint = f" (did you mean '{key}.{close[0]}'?)" if close else ""
            raise ValueError(f"{prefix}key '{key}.{k}' is not an argument of model {name!r}{hint}. Accepted: "
                             f"{', '.join(options)}")
    missing = [r for r in required if r not in kwargs and r not in provided]
    if missing:
        raise ValueError(f"{prefix}model {name!r} needs '{key}.{missing[0]}' (required arguments: "
                         f"{', '.join(missing)})")
