"""The brackets around rule layers' own forwards: which rule layer is running, and what each of its calls saw.

Used by the probe (:mod:`.plan`) and the capture (:mod:`.capture`) alike, so a parameter use is
inside its layer exactly when the layer's own forward makes it.
"""
from __future__ import annotations


class _Brackets:
    """Context manager: each rule layer's own forward runs inside a bracket (an instance-level
    ``forward`` that the module's ``__call__`` calls after every forward pre-hook and before every
    forward hook, global ones included). The bracket pushes the layer on ``stack`` while its
    class forward runs, so a parameter use is inside the layer exactly when the layer's own
    forward makes it (a hook that reads the weight is outside), and hands (module, call index,
    input, raw output) to ``record``, which may return a replacement output (a clone)."""

    def __init__(self, modules, stack: list, record):
        self.modules, self.stack, self.record = list(modules), stack, record

    def __enter__(self):
        for m in self.modules:
            m.__dict__["forward"] = self._bracket(m)
        return self

    def _bracket(self, m):
        cls_forward = type(m).forward
        stack, record = self.stack, self.record

        def forward(*args, **kwargs):
            stack.append(m)
            try:
                out = cls_forward(m, *args, **kwargs)
            finally:
                stack.pop()
            rep = record(m, _first_input(args, kwargs), out)
            return out if rep is None else rep

        return forward

    def __exit__(self, *exc):
        for m in self.modules:
            m.__dict__.pop("forward", None)
        return False


def _first_input(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)
