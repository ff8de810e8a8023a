"""Model families by name. Every module in this package defines one family (a ``Family`` subclass) and registers
an instance with ``@register_family``; the package imports all its modules, so adding a family is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import Registry
from .base import Capabilities, Family, rename_prefixes

FAMILIES: Registry[Family] = Registry("model family")


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: register one instance of a Family subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a 'name'")
    FAMILIES.register(cls.name)(cls())
    return cls


def get_family(name: str) -> Family:
    """The registered family ``name`` (KeyError listing the families otherwise)."""
    return FAMILIES.get(name)


def list_families() -> list[str]:
    return FAMILIES.list()


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["FAMILIES", "Capabilities", "Family", "get_family", "list_families", "register_family", "rename_prefixes"]
