"""The pilot runs that fixed the ResNet-18 half of the `cpu` preset of the CNN sweep (docs/REPRODUCTION.md).

Each run is one `cnn_sweep.train_run` of the ResNet-18 (÷8 widths, the authors' gain 1) on the preset's
data (Fashion-MNIST, 8000 training images, 2000 validation, seed 0) for 12 epochs, one record per line
appended to OUT. The protocol (24 epochs, the α and η0 grids) was chosen from their train and
validation accuracies and committed before the full run.

    OMP_NUM_THREADS=1 python scripts/pilot_cnn_resnet.py OUT ALPHA:ETA0 [ALPHA:ETA0 ...]
    (as run: ... 1:0.1 1:0.01 and, in a second process, 0.1:0.1 0.1:1.0, then 1000:0.1 0.1:0.01)
"""
import json
import sys

import torch

from lazyfast.experiments import cnn_sweep as cs

if __name__ == "__main__":
    torch.set_num_threads(1)
    runs = [tuple(map(float, r.split(":"))) for r in sys.argv[2:]]
    cfg = cs.make_config("cpu-resnet", subsets=[None], epochs=[12])
    data = cs.load_data(cfg)
    for alpha, lr in runs:
        r = cs.train_run(cfg, 0, 0, "network", alpha, lr, data)
        r.pop("stability", None)
        with open(sys.argv[1], "a") as f:
            f.write(json.dumps(r) + "\n")
        print(alpha, lr, r["train_acc"], r["final_val_acc"], r["final_train_acc"], r["seconds"], flush=True)
