"""Worker for tests/test_distributed_training.py: trains a small LazyModel or Linearized with
train_data_parallel, under torchrun (DDP, gloo) or as one plain process, and saves the result."""
import sys, torch
import lazyfast
from lazyfast.distributed import init_from_env, rank_and_world, shutdown, train_data_parallel
created = init_from_env("gloo")
kind, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
base = lazyfast.TwoLayer(5, 16, 2, activation="tanh", bias=True, dtype=torch.float64)
x = torch.randn(22, 5, dtype=torch.float64); y = torch.randn(22, 2, dtype=torch.float64)
model = lazyfast.LazyModel(base, 10.0) if kind == "lazy" else lazyfast.Linearized(base)
res = train_data_parallel(model, x, y, steps=7, lr=0.5, batch_size=8, momentum=0.9, lr_decay=0.1)
if rank_and_world()[0] == 0:
    torch.save(res, out)
if created:
    shutdown()
