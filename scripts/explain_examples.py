"""``lazyfast.explain`` on real models nobody here wrote: timm convnext_atto and Hugging Face GPT-2 (random
init, eval mode), written to docs/figures/explain-<model>.txt with the stamp of the run.

    python scripts/explain_examples.py [--n 16]

Needs timm and transformers (the ``bench`` extra); no download (random init only).
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lazyfast  # noqa: E402
from lazyfast import zoo  # noqa: E402
from lazyfast._store import atomic_write  # noqa: E402
from lazyfast.bench.protocol import stamp  # noqa: E402

MODELS = ("timm_convnext_atto", "hf_gpt2")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="batch size the explanation is for")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    for name in MODELS:
        model, x = zoo.build(name), zoo.inputs(name, args.n)
        e = lazyfast.explain(model, x)
        st = stamp(f"python scripts/explain_examples.py --n {args.n}")
        head = (f"# lazyfast.explain({name}, x of shape {tuple(x.shape)}, dtype {x.dtype})\n"
                f"# {st['command']}; {st['date']}, commit {st['commit']}, {st['machine']}, torch {st['torch']}\n")
        path = os.path.join(args.out, f"explain-{name}.txt")
        atomic_write(path, (head + str(e) + "\n").encode())
        print(f"{path}: {e.implementation}, {100 * e.rule_fraction:.2f} % of parameters on rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
