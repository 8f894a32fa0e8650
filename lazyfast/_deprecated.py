"""Deprecation shims: names that moved in 0.2 keep working for one release, with a FutureWarning."""
from __future__ import annotations

import importlib
import warnings

# old public module → (the modules its code lives in now, space-separated; what to use instead)
MOVED_MODULES = {
    "structured": ("lazyfast._engine.structured", "lazyfast.empirical_ntk(implementation='structured'), lazyfast.explain"),
    "generic": ("lazyfast._engine.generic", "lazyfast.empirical_ntk(implementation='jacobian' or 'ntk_vp')"),
    "mlp": ("lazyfast._engine.mlp lazyfast._ops.hadamard_gram", "lazyfast.empirical_ntk (an MLP takes the structured engine)"),
    "two_layer": ("lazyfast._engine.two_layer lazyfast._ops.two_layer", "lazyfast.empirical_ntk / jvp / vjp / ntk_vp (a TwoLayer takes "
                  "the fused kernels)"),
    "ops": ("lazyfast._ops.gram", "lazyfast.gram"),
    "bench_models": ("lazyfast.bench.models", "lazyfast bench --workloads models"),
    "rules": ("lazyfast._engine.structured.rules", "lazyfast.register_rule / unregister_rule / registered_rules"),
}
REMOVED_IN = "0.3"


def warn_moved(old: str) -> None:
    new, instead = MOVED_MODULES[old]
    warnings.warn(f"lazyfast.{old} is internal since lazyfast 0.2 (now {' / '.join(new.split())}) and will be removed in {REMOVED_IN}; "
                  f"use {instead}", FutureWarning, stacklevel=3)


def module_getattr(old: str):
    """A module ``__getattr__`` for the shim file ``lazyfast/<old>.py``: warns, then forwards."""
    homes = MOVED_MODULES[old][0].split()

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for home in homes:
            mod = importlib.import_module(home)
            if hasattr(mod, name):
                warn_moved(old)
                return getattr(mod, name)
        raise AttributeError(f"module 'lazyfast.{old}' has no attribute {name!r}")

    return __getattr__
