"""Beyond one machine: block-partitioned eNTK Gram matrices on ``torch.distributed``.

Launch with ``torchrun`` (gloo on CPU, NCCL on GPU). Θ(x1, x2) is cut into row
blocks of ``block_size`` rows; rank r computes blocks r, r + W, r + 2W, … with the
fastest implementation lazyfast has for the model (``lazyfast.empirical_ntk``).
With ``out_dir`` every block is written as its own file (atomically) and a
restarted run skips blocks already on disk, so a killed job loses at most the
blocks in progress. Rank 0 then assembles the kernel (from the files, or, without
``out_dir``, by gathering the blocks) when ``gather=True``.

Memory per rank: the model, x2, one block of the kernel (block_size · n2 · k²
numbers in "full" mode) and whatever the chosen implementation holds.
"""
from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lazyfast import _store
from lazyfast._engine.state import _plain_attrs
from lazyfast._validation import (check_bool, check_input, check_mode, check_module, check_positive_finite,
                                  probe_out_features)
from lazyfast.lazy import scaled_loss
from lazyfast.ntk import empirical_ntk

MANIFEST = "manifest.json"
_SHARD_MAGIC = b"LAZYFAST-SHARD1\x00"


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def row_blocks(n: int, block_size: int):
    """[(start, end), …] covering range(n) in blocks of ``block_size`` rows."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return [(s, min(s + block_size, n)) for s in range(0, n, block_size)]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The values of ``t`` as bytes, for any tensor: 0-dim, any dtype (int64, bool, complex,
    bfloat16, ...), non-contiguous or a view with the conjugate / negative bit, sparse (its
    dense values), quantized (its dequantized values)."""
    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.numel() == 0:
        return b""
    # reshape(-1) first: view(torch.uint8) reinterprets the last dim, which a 0-dim tensor lacks
    # ("self.dim() cannot be 0 to view Long as Byte" for a BatchNorm's num_batches_tracked)
    return t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(model: nn.Module, *tensors: Optional[torch.Tensor]) -> str:
    """SHA-256 over the model's parameters and buffers, its modules' classes and plain attributes,
    and the given tensors, so shards of one problem are never mixed with shards of another.

    Every tensor counts by its name, shape, dtype and values (:func:`_tensor_bytes`: 0-dim
    counters such as BatchNorm's ``num_batches_tracked``, integer and bool tensors,
    non-contiguous views); buffers that ``state_dict`` leaves out (``persistent=False``) are
    included after the ``state_dict`` entries, so a change of any parameter or buffer value
    changes the fingerprint. Non-tensor entries of ``state_dict`` (a module's extra state)
    count by their name and type only."""
    h = hashlib.sha256()
    entries = list(model.state_dict().items())
    seen = {name for name, _ in entries}
    entries += [(name, b) for name, b in model.named_buffers() if name not in seen]
    for name, t in entries + [(f"arg{i}", t) for i, t in enumerate(tensors)]:
        if t is None:
            continue
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):
            h.update(f"<{type(t).__module__}.{type(t).__qualname__}>".encode())
            continue
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(_tensor_bytes(t))
    # what the model computes, beyond its values: each module's class and plain attributes
    # (activation names, strides, eps, ...); identical on every rank (no ids, no reprs)

    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__}:{m.training}".encode())
        h.update(repr(sorted((a, v[0]) for a, v in _plain_attrs(m).items())).encode())
    return h.hexdigest()


def _save_block(obj, path: Path) -> None:
    """A block file: the torch-serialized block behind a checksummed header
    (:func:`lazyfast._store.frame`), written atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    _store.write_framed(path, buf.getvalue(), _SHARD_MAGIC)


def _block_path(out_dir: Path, b: int) -> Path:
    return out_dir / f"block_{b:05d}.pt"


def _load_block(path: Path, b: int, rows, fp: str, shape) -> Optional[torch.Tensor]:
    """A finished block, or None if the file is missing, partial, corrupt (checksum), edited,
    or from another problem (fingerprint of the model, the data and the settings)."""
    if not path.exists():
        return None
    try:
        payload = _store.read_framed(path, _SHARD_MAGIC, what="block file")
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        ok = (obj.get("block") == b and tuple(obj.get("rows")) == tuple(rows) and obj.get("fingerprint") == fp
              and tuple(obj["kernel"].shape) == tuple(shape))
    except Exception:
        ok = False
    if not ok:
        return None
    return obj["kernel"]


@dataclass
class DistributedNTKResult:
    kernel: Optional[torch.Tensor]  # full kernel on rank 0 (gather=True), else None
    computed_blocks: List[int] = field(default_factory=list)  # blocks this rank computed in this run
    skipped_blocks: List[int] = field(default_factory=list)  # blocks this rank found finished on disk
    n_blocks: int = 0


def _write_manifest(out_dir: Path, meta: dict, overwrite: bool) -> None:
    path = out_dir / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != meta:
            if not overwrite:
                raise ValueError(
                    f"out_dir {str(out_dir)!r} holds shards of a different problem ({MANIFEST} differs: "
                    f"{old} vs {meta}); use a fresh directory or overwrite=True")
            for p in out_dir.glob("block_*.pt"):
                p.unlink()
    _store.atomic_write(path, json.dumps(meta, indent=1, sort_keys=True).encode())
    for stale in out_dir.glob(".*.tmp"):  # temporary files of writes killed midway
        try:
            stale.unlink()
        except OSError:
            pass


def distributed_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
                    implementation: str = "auto", block_size: int = 256, out_dir: Optional[str] = None,
                    gather: bool = True, overwrite: bool = False, progress=None) -> DistributedNTKResult:
    """Block-partitioned Θ(x1, x2) over the ranks of the default process group.

    Call it on every rank with the same model parameters and inputs (it works without a
    process group too, as one rank).

    Args:
        model, x1, x2, mode, implementation: as :func:`lazyfast.empirical_ntk`.
        block_size: rows of Θ per block (the unit of work and of restart).
        out_dir: directory for one file per block plus ``manifest.json``; finished blocks
            found there are skipped. None keeps blocks in memory.
        gather: assemble the kernel on rank 0.
        overwrite: allow ``out_dir`` to hold shards of a different problem (they are deleted).
        progress: True prints one line per block on stderr (rank, block, rows, seconds); a
            callable receives a dict per block instead; None/False: silent.

    Returns:
        :class:`DistributedNTKResult`; ``kernel`` is (n1, n2) or (n1, n2, k, k) on rank 0.
    """
    check_module(model)
    check_input(x1, "x1", model, allow_integer=True)  # integer inputs (token ids), as empirical_ntk takes them
    if x2 is not None:
        check_input(x2, "x2", model, like=x1, allow_integer=True)
    check_mode(mode)
    gather, overwrite = check_bool(gather, "gather"), check_bool(overwrite, "overwrite")
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path or None, got {type(out_dir).__name__}")
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise TypeError(f"progress must be a bool, a callable or None, got {type(progress).__name__}")
    rank, world = rank_and_world()
    x2_eff = x1 if x2 is None else x2
    blocks = row_blocks(x1.shape[0], block_size)
    fp = fingerprint(model, x1, x2) + f":{mode}:{block_size}"
    k = probe_out_features(model, x1 if x1.shape[0] else x2_eff)  # changes no buffer, no RNG state
    tail = (x2_eff.shape[0],) if mode == "trace" else (x2_eff.shape[0], k, k)
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        if rank == 0:
            out_path.mkdir(parents=True, exist_ok=True)
            meta = {"fingerprint": fp, "n1": x1.shape[0], "n2": x2_eff.shape[0], "k": k, "mode": mode,
                    "block_size": block_size, "n_blocks": len(blocks), "dtype": str(x1.dtype)}
            _write_manifest(out_path, meta, overwrite)
        if world > 1:
            dist.barrier()
    result = DistributedNTKResult(kernel=None, n_blocks=len(blocks))
    local = {}

    def report(b, s, e, status, seconds):
        if not progress:
            return
        info = {"rank": rank, "world": world, "block": b, "n_blocks": len(blocks), "rows": (s, e),
                "status": status, "seconds": seconds}
        if callable(progress) and not isinstance(progress, bool):
            progress(info)
        else:
            sys.stderr.write(f"rank {rank}/{world}: block {b + 1}/{len(blocks)} rows {s}:{e} {status}"
                             + (f" in {seconds:.2f} s" if status == "computed" else "") + "\n")
            sys.stderr.flush()

    for b in range(rank, len(blocks), world):
        s, e = blocks[b]
        if out_path is not None:
            done = _load_block(_block_path(out_path, b), b, (s, e), fp, (e - s,) + tail)
            if done is not None:
                result.skipped_blocks.append(b)
                report(b, s, e, "already on disk", 0.0)
                continue
        t0 = time.perf_counter()
        K = empirical_ntk(model, x1[s:e], x2_eff, mode=mode, implementation=implementation)
        if out_path is not None:
            _save_block({"block": b, "rows": (s, e), "fingerprint": fp, "kernel": K.detach().cpu()},
                        _block_path(out_path, b))
        else:
            local[b] = K.detach().cpu()
        result.computed_blocks.append(b)
        report(b, s, e, "computed", time.perf_counter() - t0)
    if world > 1:
        dist.barrier()
    if not gather:
        return result
    if out_path is None and world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if rank == 0:
            for part in gathered:
                local.update(part)
    if rank != 0:
        return result
    parts = []
    for b, (s, e) in enumerate(blocks):
        if out_path is not None:
            blk = _load_block(_block_path(out_path, b), b, (s, e), fp, (e - s,) + tail)
            if blk is None:
                raise RuntimeError(f"block {b} is missing or corrupt in {out_path} after all ranks finished")
            parts.append(blk)
        else:
            parts.append(local[b])
    dtype = next(p for p in model.parameters()).dtype
    result.kernel = torch.cat(parts) if parts else torch.zeros((0,) + tail, dtype=dtype)
    return result


def shutdown() -> None:
    """Ends the default process group cleanly: a barrier first, so no rank tears down its
    communication threads while another still talks to it (a torn-down gloo pair can abort
    the process with "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def init_from_env(backend: Optional[str] = None) -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE set).
    Returns True if a group was created. Backend: NCCL when CUDA is available, else gloo."""
    if "WORLD_SIZE" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


# ----------------------------------------------------------------------------- data-parallel training
def _shard(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return idx[rank::world]


def train_data_parallel(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
                        batch_size: Optional[int] = None, momentum: float = 0.0, lr_decay: float = 0.0,
                        alpha: Optional[float] = None, loss: str = "square", seed: int = 0) -> dict:
    """Data-parallel (DDP) training of a :class:`~lazyfast.LazyModel`, a
    :class:`~lazyfast.Linearized` or any module, on the scaled objective R(α·h)/α².

    Every rank holds all of ``x``/``y`` (or the same view of them) and draws the same
    global batch order from ``seed``; rank r takes samples r, r + W, … of each batch.
    Each rank's loss is weighted by its share of the batch, so DDP's gradient average
    is exactly the gradient of the global batch mean: the run follows single-process
    training up to floating-point summation order.

    Args:
        module: the model; its output is α·h (``alpha`` defaults to ``module.alpha`` or 1).
        x: (n, ...) inputs; y: (n, k) targets or (n,) labels.
        steps: optimizer steps; batch_size: None = full batch, else global mini-batch size.
        lr, momentum, lr_decay: SGD with η_t = lr / (1 + lr_decay·t).
        loss: ``"square"`` or ``"cross_entropy"``.

    Returns:
        dict with ``losses`` (global batch objective before each step) and ``state_dict``.
    """

    check_positive_finite(lr, "lr")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"y has {y.shape[0]} samples but x has {x.shape[0]}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    alpha = float(alpha if alpha is not None else getattr(module, "alpha", 1.0))
    rank, world = rank_and_world()
    net = DistributedDataParallel(module) if world > 1 else module
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + lr_decay * t))
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    order, pos, losses = torch.arange(n), n, []
    for _ in range(steps):
        if batch_size is None:
            idx = torch.arange(n)
        else:
            if pos >= n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx, pos = order[pos:pos + batch_size], pos + batch_size
        local = _shard(idx, rank, world).to(x.device)
        weight = local.numel() * world / idx.numel()
        opt.zero_grad(set_to_none=True)
        out = net(x[local])
        obj = scaled_loss(out, y[local], alpha, loss) * weight
        obj.backward()
        with torch.no_grad():
            total = obj.detach().clone() / world
            if world > 1:
                dist.all_reduce(total)
        losses.append(float(total))
        opt.step()
        sched.step()
    if world > 1:
        # Free the DDP reducer now, while the process group is alive: left to the garbage
        # collector it can be destroyed at interpreter exit, after the group, and abort.
        del net
        gc.collect()
        dist.barrier()
    return {"losses": losses, "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}}
