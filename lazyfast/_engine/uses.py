"""Where a forward uses the trainable parameters: the engine's per-call verification (docs/engine.md,
"Exact on every call").

Parameters are identified by **storage**, not by Python object: a view, ``.T`` or list entry made
before the forward (``self.wT = self.fc.weight.T`` in ``__init__``) is still that parameter.

* :class:`ParamUses` watches a forward of the real module on the real batch: every use of a
  parameter covered by a layer rule outside that layer's own forward (the stack of running rule
  layers is kept by the engine's brackets), and every use of any trainable parameter through an
  alias made before the forward.
* :class:`AliasGuard` watches the forwards of the paths that substitute parameters by name
  (``torch.func.functional_call``: the generic eNTK path, JVP/VJP/NTK·v): a use of the original
  parameter's storage there is an alias the substitution cannot follow, so the result would be
  silently wrong; the guard raises instead.

Metadata reads (``.dtype``, ``.shape``, ``.device``, ``size()``, ...) are not uses.
"""
from __future__ import annotations

import bisect
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lazyfast._engine.state import functorch_wrapped as _functorch_wrapped

# Tensor attributes / methods that read metadata only (no values, no view of the storage).
_META = frozenset({
    "dtype", "shape", "device", "requires_grad", "is_cuda", "is_cpu", "ndim", "is_leaf", "layout", "names",
    "grad_fn", "is_sparse", "is_quantized", "is_meta", "is_mkldnn", "is_nested", "size", "numel", "dim",
    "stride", "is_contiguous", "element_size", "data_ptr", "nelement", "get_device", "is_floating_point",
    "is_complex", "storage_offset", "_version", "grad", "__len__", "untyped_storage", "itemsize", "nbytes",
    "is_inference", "output_nr", "is_signed", "__hash__", "__format__", "__repr__",
})


def _func_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _tensors(obj, depth: int = 2) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth and isinstance(obj, (list, tuple)):
        for e in obj:
            yield from _tensors(e, depth - 1)
    elif depth and isinstance(obj, dict):
        for e in obj.values():
            yield from _tensors(e, depth - 1)


def storage_key(t: torch.Tensor) -> Optional[tuple]:
    """(device, storage address) of a plain strided tensor with storage, else None."""
    try:
        if t.layout != torch.strided or t.is_meta or _functorch_wrapped(t):
            return None
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return (t.device.type, t.device.index, ptr) if ptr else None


def parameter_storages(model: nn.Module) -> Dict[tuple, str]:
    """storage key → name, for the trainable parameters of ``model``."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.numel():
            key = storage_key(p)
            if key is not None:
                out.setdefault(key, name)
    return out


def parameter_spans(model: nn.Module) -> Optional[List[Tuple[int, int]]]:
    """The merged (start, end) byte addresses of the trainable parameters' storages (:func:`merge_spans`),
    or None where one has no plain storage (then every tensor gets the full check)."""
    spans = []
    for p in model.parameters():
        if p.requires_grad and p.numel():
            try:
                if p.layout != torch.strided or p.is_meta or _functorch_wrapped(p):
                    return None
                st = p.untyped_storage()
                spans.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
            except (RuntimeError, NotImplementedError, TypeError):
                return None
    return merge_spans(spans) if spans else None


class _Watch(TorchFunctionMode):
    """Base: calls ``self._arg(t)`` for every tensor argument of every torch function (metadata
    reads excepted) and records the outputs that are views of a parameter's storage made here."""

    def __init__(self, storages: Dict[tuple, str], spans: Optional[List[Tuple[int, int]]] = None):
        super().__init__()
        self.storages = storages
        self.made: set = set()
        self._keep: list = []  # the views made here stay alive, so their ids stay theirs
        # (start, end) of the parameters' storages, sorted and merged: a tensor whose first element
        # lies in none of them cannot share one (its storage_key, which costs a storage object, is skipped)
        self._starts, self._ends = ([a for a, _ in spans], [b for _, b in spans]) if spans else (None, None)

    def _outside(self, t) -> bool:
        """True when ``t`` cannot share a parameter's storage: a tensor of a torch.func transform
        (no storage of its own: :func:`storage_key` is None for it too; an alias made before the
        call is a plain tensor), or one whose first element lies outside every parameter storage."""
        if _functorch_wrapped(t):
            return True
        if self._starts is None:
            return False
        try:
            ptr = t.data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            return False
        i = bisect.bisect_right(self._starts, ptr) - 1
        return i < 0 or ptr >= self._ends[i]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _func_name(func) not in _META:
            for t in _tensors(args):
                self._arg(t)
            for t in _tensors(kwargs):
                self._arg(t)
        out = func(*args, **kwargs)
        self._made(out)
        return out

    def _made(self, out) -> None:
        if self.storages:
            for o in _tensors(out, 1):
                if id(o) not in self.made and not self._outside(o) and storage_key(o) in self.storages:
                    self.made.add(id(o))
                    self._keep.append(o)

    def _arg(self, t):  # pragma: no cover - overridden
        raise NotImplementedError


class ParamUses(_Watch):
    """Watches a forward of the real module (no substitution).

    ``owner``: id of each parameter a rule covers → the rule's module; ``stack``: the rule modules
    whose own forward is running (kept by the engine). Fills ``foreign`` (names of covered
    parameters used outside their layer's forward) and ``aliased`` (names of trainable
    parameters used through a tensor made before the forward that shares their storage).

    Operator-rule sites (docs/engine.md, "Operator rules") are found by ``match``, the rules'
    matcher (:func:`lazyfast._engine.structured.rules.ops.match_op`): ``match(name, func, args,
    kwargs, is_param)`` → (kind, input, weight, bias, meta) for a recognized op whose parameter
    slots hold parameters ``is_param`` accepts, else None."""

    def __init__(self, model: nn.Module, owner: Dict[int, nn.Module], stack: list, site_params=(), sites=None,
                 record_site=None, match=None):
        trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(parameter_storages(model), parameter_spans(model))
        self.owner, self.stack, self.names = owner, stack, trainable
        self.foreign: set = set()
        self.aliased: set = set()
        # operator-rule sites. Probe: ``site_params`` (ids) may form sites, keyed on first use;
        # capture: ``sites`` maps each planned site's parameter ids to its key. ``record_site(key,
        # input, output, meta)`` sees each site call and may return a replacement output.
        self.site_params = set(site_params) | set(sites or ())
        self.planned = sites
        self.record_site = record_site
        self.match = match
        self.key_of: Dict[int, tuple] = {}
        self.bad_keys: set = set()
        self.site_foreign: set = set()
        self.shared: Dict[int, tuple] = {}  # id(z) -> (z, key): expanded shared-call outputs (watch_shared)
        self.shared_bad: set = set()
        self.views: Dict[int, tuple] = {}  # id(v) -> (parameter, v): order-keeping views of site parameters

    def watch_shared(self, z: torch.Tensor, key) -> None:
        """Watches the consumers of ``z``, a shared call's output expanded to the batch (docs/engine.md,
        "Shared calls"): a use other than a batch-wise elementwise op or a metadata read puts ``key``
        in ``shared_bad``."""
        self.shared[id(z)] = (z, key)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.shared:
            return self._call(func, types, args, kwargs)
        ins = list(_tensors(args)) + list(_tensors(kwargs or {}))
        used = [v for t in ins if (v := self.shared.get(id(t)))]
        out = self._call(func, types, args, kwargs)
        for z, key in used:
            if not _batchwise_use(_func_name(func), args, kwargs or {}, z, out):
                self.shared_bad.add(key)
            elif isinstance(out, torch.Tensor) and id(out) not in self.shared and \
                    all(id(t) in self.shared or t.dim() < z.dim() or t.shape[0] == 1 != z.shape[0] for t in ins):
                # still the same rows for every sample (z.to(dtype), z * scale): watched on
                self.shared[id(out)] = (out, key)
        return out

    def _call(self, func, types, args, kwargs):
        if self.site_params and self.match is not None:
            name = _func_name(func)
            if name in _PARAM_VIEWS and args and self._is_site(args[0]) and _keeps_order(name, args, kwargs or {}):
                # γ.reshape(1, -1, 1, 1) made in the forward: still γ, in the order of its numbers
                out = func(*args, **(kwargs or {}))
                self._made(out)
                if isinstance(out, torch.Tensor) and out.numel() == args[0].numel():
                    self.views[id(out)] = (self._base(args[0]), out)
                else:
                    self._arg(args[0])
                return out
            m = self.match(name, func, args, kwargs or {}, self._is_site)
            if m is not None and self._claim(m):
                kind, inp, w, b, meta = m
                for t in list(_tensors(args)) + list(_tensors(kwargs or {})):
                    if t is not w and t is not b:
                        self._arg(t)
                out = func(*args, **(kwargs or {}))
                self._made(out)  # a view of the parameter made here (β.expand) is not an alias
                key = self._key(m)
                if any(t is not None and id(t) in self.views for t in (w, b)):
                    meta = dict(meta, view_shape=tuple((w if w is not None else b).shape))
                # a broadcast site (β.expand(n, ...)) has no input: its output stands for it
                rep = self.record_site(key, out if inp is None else inp, out, meta) if self.record_site else None
                out = out if rep is None else rep
                if kind == "broadcast":  # every sample's rows are the parameter: its consumers are watched
                    self.watch_shared(out, key)
                return out
        return super().__torch_function__(func, types, args, kwargs)

    def _base(self, t):
        """The parameter behind ``t`` (``t`` itself, or the parameter an order-keeping view was made of)."""
        v = None if t is None else self.views.get(id(t))
        return t if v is None else v[0]

    def _key(self, m) -> tuple:
        kind, _, w, b, _ = m
        return kind, _id(self._base(w)), _id(self._base(b))

    def _is_site(self, t) -> bool:
        return isinstance(t, torch.Tensor) and (id(t) in self.site_params or id(t) in self.views)

    def _claim(self, m) -> bool:
        kind, _, w, b, _ = m
        if kind not in _VIEW_KINDS and any(t is not None and id(t) in self.views for t in (w, b)):
            return False  # a view in a norm / linear slot: the shell holds the parameter's own shape
        key = self._key(m)
        if self.planned is not None:
            return all(self.planned.get(i) == key for i in key[1:] if i is not None)
        for i in key[1:]:
            if i is None:
                continue
            old = self.key_of.setdefault(i, key)
            if old != key:
                self.bad_keys |= {old, key}
        return True

    def _arg(self, t):
        t = self._base(t)
        i = id(t)
        m = self.owner.get(i)
        if m is not None:
            if not self.stack or self.stack[-1] is not m:
                self.foreign.add(self.names[i])
            return
        if i in self.site_params and self.planned is None:
            self.site_foreign.add(i)
            return
        if i in self.names or i in self.made or not self.storages or self._outside(t):
            return
        key = storage_key(t)
        if key in self.storages:
            self.aliased.add(self.storages[key])


class AliasGuard(_Watch):
    """Watches a forward in which the parameters are substituted by name (``functional_call``):
    raises ValueError on a use of an original parameter's storage by a tensor that is not one of
    the substitutes (``allowed``, ids) and was not made in this forward."""

    def __init__(self, storages: Dict[tuple, str], allowed: Iterable[torch.Tensor],
                 spans: Optional[List[Tuple[int, int]]] = None):
        super().__init__(storages, spans)
        self.allowed = {id(t) for t in allowed}
        self._allowed_refs = list(allowed)

    def _arg(self, t):
        i = id(t)
        if i in self.allowed or i in self.made or not self.storages or self._outside(t):
            return
        key = storage_key(t)
        if key in self.storages:
            raise ValueError(alias_message(self.storages[key]))



def merge_spans(spans: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """(start, end) address ranges of parameter storages, sorted and merged: :class:`AliasGuard`'s
    pre-filter (any device: two devices' overlapping addresses only cost a full check)."""
    merged: List[Tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


# binary elementwise ops: out[i] depends on the expanded shared output z only through z[i] when
# out has z's shape (the other operand broadcasts into z)
_ELEMENTWISE = frozenset({"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__",
                          "sub_", "mul", "__mul__", "__rmul__", "__imul__", "mul_"})


# views that keep a parameter's numbers in their order (a site may take γ through one of them)
_PARAM_VIEWS = frozenset({"reshape", "view", "unsqueeze", "squeeze", "flatten", "__getitem__"})
_VIEW_KINDS = frozenset({"scale", "shift", "broadcast"})


def _keeps_order(name: str, args, kwargs) -> bool:
    """Whether the view call keeps the order of the numbers: indexing only by None, ``...`` and ``:``."""
    if name != "__getitem__":
        return not any(isinstance(t, torch.Tensor) for t in list(args[1:]) + list(kwargs.values()))
    idx = args[1] if len(args) > 1 else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in idx)


# calls that keep each row of their one tensor argument in place (a copy, a dtype / device change)
_ROWWISE = frozenset({"to", "type_as", "contiguous", "clone", "float", "double", "half", "bfloat16"})
_CAT = frozenset({"cat", "concat", "concatenate"})


def _batchwise_use(name: str, args, kwargs, z: torch.Tensor, out) -> bool:
    """Whether a call that takes ``z`` keeps each sample's row of ``z`` in that sample: a metadata
    read, a call that returns ``z`` itself (``.to`` its own dtype / device), a copy or dtype change
    of ``z`` of its shape, a concatenation along another dim than the batch's (dim 0) of tensors
    that all hold the batch, or a binary elementwise op whose result has ``z``'s shape and that does
    not write into ``z``."""
    if name in _META:
        return True
    if (name.startswith("__i") or name.endswith("_")) and args and args[0] is z:
        return False  # writes into z (and returns it)
    if out is z:
        return True
    if not isinstance(out, torch.Tensor):
        return False
    if name in _ROWWISE:
        return args[0] is z and tuple(out.shape) == tuple(z.shape)
    if name in _CAT:
        ts = args[0] if args else kwargs.get("tensors", ())
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return (isinstance(dim, int) and dim % z.dim() != 0 and out.shape[0] == z.shape[0]
                and all(isinstance(t, torch.Tensor) and t.dim() == z.dim() and t.shape[0] == z.shape[0] for t in ts))
    if name not in _ELEMENTWISE or len(args) != 2 or set(kwargs) - {"alpha"}:
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(z.shape)


def _id(t):
    return None if t is None else id(t)


def alias_message(name: str) -> str:
    return (f"parameter {name!r} is used in the forward through an alias made before the call (a view, .T or "
            f"slice of it, or the tensor held in a list / dict / plain attribute, e.g. self.wT = self.fc.weight.T "
            f"in __init__): lazyfast substitutes parameters by name and cannot follow such an alias, so the kernel "
            f"would be silently wrong. Compute the view inside forward() (x @ self.fc.weight.T) or reach the "
            f"parameter through its module")
