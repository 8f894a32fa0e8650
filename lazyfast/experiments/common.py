"""Shared plumbing for the experiments: configs and presets, the resumable run store,
progress bars, dtype/device parsing and small statistics.

Every experiment module defines a dataclass ``Config`` with classmethods ``quick()`` and
``paper()`` and a function ``run(config, store=None) -> dict`` returning a plain,
JSON-serializable dict. A sweep is split into *runs* (usually one trial); each finished run is
appended to a checksummed JSONL file by :class:`RunStore`, so a rerun skips it and a killed
sweep loses at most the run in progress.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from lazyfast._store import JsonlLog, file_digest, tensor_digest

PRESETS = ("quick", "paper", "cpu", "cpu-vgg", "cpu-resnet")  # the cpu* presets: cnn-sweep only
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- configs
def make_config(config_cls, preset: str = "quick", **overrides):
    """``config_cls.quick()`` or ``.paper()`` with ``overrides`` applied (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    factory = getattr(config_cls, preset.replace("-", "_"), None)
    if factory is None:
        raise ValueError(f"preset {preset!r} is not defined for this experiment ({config_cls.__name__}); "
                         "the cpu presets exist for cnn-sweep only")
    cfg = factory()
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in fields:
            raise ValueError(f"{config_cls.__module__}.{config_cls.__name__} has no option {k!r}; "
                             f"options: {sorted(fields)}")
        changes[k] = v
    cfg = dataclasses.replace(cfg, **changes)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


@dataclasses.dataclass
class ExperimentConfig:
    """Settings every experiment's ``Config`` shares (each adds its own fields and ``seed``).

    ``paper()`` is the authors' setup, i.e. the defaults; subclasses define ``quick()`` and may
    override ``paper()``."""

    dtype: str = "float64"
    device: str = "cpu"
    show_progress: bool = True

    @classmethod
    def paper(cls):
        return cls()


def config_dict(cfg) -> Dict[str, Any]:
    """The config as a JSON-friendly dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def fingerprint(cfg, exclude: Iterable[str] = ()) -> str:
    """Short hash of the config fields that determine a run's result (``exclude`` those that do not,
    e.g. the number of trials, which only says how many runs there are)."""
    d = {k: v for k, v in config_dict(cfg).items() if k not in set(exclude)}
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def resolve_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype must be float32 or float64, got {name}")
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_device(name) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch.cuda.is_available() is False")
    return torch.device(name)


def check_positive(value, name, integer=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and isinstance(value, int)
    if not ok:
        kind = "a positive int" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_positive_list(values, name):
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    for i, v in enumerate(values):
        check_positive(v, f"{name}[{i}]")


# ----------------------------------------------------------------------------- resumable runs
class RunStore:
    """Append-only store of finished runs, keyed by a string (``runs.jsonl``).

    ``path=None`` keeps runs in memory only. On disk it is a :class:`lazyfast._store.JsonlLog`:
    each line is ``{"key", "fingerprint", "result", "sha256"}``, the SHA-256 of the record's
    own canonical JSON, written in one ``write`` and fsync'ed. On open, a torn last line (a
    kill mid-write) is reported once and cut off, records that fail their checksum (edited by
    hand, or from an older lazyfast) are reported and not reused, and a file that is not UTF-8
    raises :class:`lazyfast._store.IntegrityError` naming it.

    ``fingerprint``: the problem the runs belong to (e.g. a digest of the data files a run
    reads); a stored run is reused only when its key AND fingerprint match, so runs on other
    data are recomputed instead of silently reused.
    """

    def __init__(self, path: Optional[str] = None, *, fingerprint: Optional[str] = None):
        self.path = path
        self.fingerprint = fingerprint
        self._runs: Dict[str, Any] = {}
        self._seconds: Dict[str, Optional[float]] = {}  # compute time of each run, when it was computed
        self._from_disk: set = set()
        self._used: set = set()  # keys returned by run() in this process
        self._log = None
        if path is not None:
            self._log = JsonlLog(path)
            for rec in self._log.records():
                if rec.get("fingerprint") == fingerprint and "key" in rec and "result" in rec:
                    self._runs[rec["key"]] = rec["result"]
                    sec = rec.get("seconds")
                    self._seconds[rec["key"]] = float(sec) if isinstance(sec, (int, float)) else None
                    self._from_disk.add(rec["key"])

    def __contains__(self, key: str) -> bool:
        return key in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    def __bool__(self) -> bool:  # an empty store is still a store (`store or default` must not drop it)
        return True

    def get(self, key: str):
        return self._runs[key]

    def put(self, key: str, result: Any, seconds: Optional[float] = None) -> None:
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        result = json_safe(result)
        # canonical JSON round trip: what is returned now is exactly what a rerun will read
        result = json.loads(json.dumps(result, allow_nan=False))
        if self._log is not None:
            rec = {"key": key, "fingerprint": self.fingerprint, "result": result}
            if seconds is not None:
                rec["seconds"] = float(seconds)
            self._log.append(rec)
        self._runs[key] = result
        self._seconds[key] = None if seconds is None else float(seconds)
        self._from_disk.discard(key)

    def run(self, key: str, fn: Callable[[], Any]):
        """The stored result for ``key``, or ``fn()`` computed now and appended (with its compute time)."""
        self._used.add(key)
        if key in self._runs:
            return self._runs[key]
        t0 = time.perf_counter()
        result = fn()
        self.put(key, result, seconds=time.perf_counter() - t0)
        return self._runs[key]

    def timing(self) -> Dict[str, Any]:
        """Compute time of the runs used (``run()``) in this process, resumed ones included:
        ``run_seconds`` sums every used run's own compute time as recorded when it ran
        (``runs_without_time`` counts used runs stored without one, e.g. by an older lazyfast),
        ``runs_resumed`` / ``runs_computed`` split them into read from the store and computed now."""
        used = sorted(self._used)
        secs = [self._seconds.get(k) for k in used]
        return {"run_seconds": sum(s for s in secs if s is not None),
                "runs_without_time": sum(s is None for s in secs),
                "runs_resumed": sum(k in self._from_disk for k in used),
                "runs_computed": sum(k not in self._from_disk for k in used)}


def data_fingerprint(*tensors, files=()) -> str:
    """Digest of the data a run reads (tensors and/or files), for ``RunStore(fingerprint=...)``."""
    h = hashlib.sha256()
    h.update(tensor_digest(*tensors).encode())
    if files:
        h.update(file_digest(files).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- progress
def progress(iterable=None, total=None, desc=None, leave=True, enabled=True, **kw):
    """A tqdm progress bar on stderr (a plain iterator when tqdm is missing or ``enabled`` is False)."""
    disable = not enabled or os.environ.get("LAZYFAST_NO_PROGRESS") == "1"
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency
        class _Null:
            def __init__(self, it):
                self.it = it

            def __iter__(self):
                return iter(self.it if self.it is not None else ())

            def update(self, n=1):
                pass

            def set_postfix(self, *a, **k):
                pass

            def close(self):
                pass

        return _Null(iterable)
    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=disable, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- statistics
def spearman(x: List[float], y: List[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {len(x)} and {len(y)}")

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return float("nan")
    return cov / math.sqrt(vx * vy)


def loglog_slope(x: List[float], y: List[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = [math.log(v) for v in x]
    ly = [math.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly))
    den = sum((a - mx) ** 2 for a in lx)
    return num / den


def mean_std(rows: List[List[float]]):
    """Column mean and sample std (ddof=1; 0 with one value) of a list of equal-length rows,
    ignoring non-finite entries (diverged runs; None reads as NaN); NaN where no entry is finite."""
    t = torch.tensor([[float("nan") if v is None else v for v in r] for r in rows], dtype=torch.float64)
    ok = torch.isfinite(t)
    cnt = ok.sum(0)
    z = torch.where(ok, t, torch.zeros_like(t))
    mean = z.sum(0) / cnt.clamp_min(1)
    var = (torch.where(ok, t - mean, torch.zeros_like(t)) ** 2).sum(0) / (cnt - 1).clamp_min(1)
    mean = torch.where(cnt > 0, mean, torch.full_like(mean, float("nan")))
    std = torch.where(cnt > 1, var.sqrt(), torch.zeros_like(mean))
    return mean.tolist(), std.tolist()


def count_nonfinite(rows: List[List[float]]) -> List[int]:
    """Per column, how many rows hold a non-finite value (e.g. diverged runs)."""
    return [sum(1 for r in rows if r[i] is None or not math.isfinite(r[i])) for i in range(len(rows[0]))] if rows else []


def json_safe(obj):
    """``obj`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def log_indices(n: int, k: int = 100) -> List[int]:
    """About ``k`` distinct 0-based indices in [0, n), log-spaced (as the authors' cover plot)."""
    if n <= 0:
        return []
    idx = sorted({min(n - 1, int(math.floor(math.exp(i * math.log(n) / max(k - 1, 1)))) - 1) for i in range(k)})
    return [max(0, i) for i in idx]


def tolist(t: torch.Tensor):
    return t.detach().to("cpu", torch.float64).tolist()
