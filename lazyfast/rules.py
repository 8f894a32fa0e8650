"""Deprecated alias (lazyfast 0.2): ``lazyfast.rules`` is internal; every attribute access warns and forwards."""
from lazyfast._deprecated import module_getattr

__getattr__ = module_getattr("rules")
