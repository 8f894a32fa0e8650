"""Deprecated alias (lazyfast 0.2): ``lazyfast.bench_models`` is ``lazyfast.bench.models``; every attribute access warns and forwards."""
from lazyfast._deprecated import module_getattr

__getattr__ = module_getattr("bench_models")
