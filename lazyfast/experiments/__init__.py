"""Reproductions of the experiments of Chizat, Oyallon & Bach (NeurIPS 2019).

One module per experiment, each with a ``Config`` dataclass (``quick()`` / ``paper()`` presets)
and ``run(config, store=None) -> dict``. :func:`lazyfast.experiments.runner.reproduce` runs one by
name, saves ``results.json`` and its figure; ``lazyfast reproduce NAME`` is the command line.
"""
import importlib

# CLI name -> module (imported on demand: the CNN experiments need more than the two-layer ones).
EXPERIMENTS = {
    "cover": "lazyfast.experiments.cover",
    "tau-sweep": "lazyfast.experiments.tau_sweep",
    "width-sweep": "lazyfast.experiments.width_sweep",
    "population-sgd": "lazyfast.experiments.population_sgd",
    "rates": "lazyfast.experiments.rates",
    "kernel-equivalence": "lazyfast.experiments.kernel_equivalence",
    "cnn-alpha": "lazyfast.experiments.cnn_alpha",
    "cnn-sweep": "lazyfast.experiments.cnn_sweep",
    "kernel-spectrum": "lazyfast.experiments.kernel_spectrum",
    "demo": "lazyfast.experiments.demo",
}


def get(name: str):
    """The module of experiment ``name`` (one of :data:`EXPERIMENTS`)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


__all__ = ["EXPERIMENTS", "get"]
