#!/usr/bin/env python
"""Counts how lazyfast answers bad calls: tries every fixed bad value of every entry of the
bad-input catalogue (tests/test_bad_inputs.py: constructors, eNTK/JVP/VJP/NTK·v on the
fused, structured and generic routes, LazyModel, Linearized, scaled_loss, the solvers,
TrainConfig/train and the raw torch.ops.lazyfast.* ops) and prints a table:

  tried       bad calls made
  clear       TypeError/ValueError (RuntimeError from TORCH_CHECK for raw ops) naming the argument
  unclear     another exception, or one that does not name the argument
  accepted    no exception at all (a silent accept)

Every unclear or accepted call that the catalogue documents is listed with the reason it is
acceptable (or the pending fix); any other one is listed as UNEXPECTED and the exit status is 1.

Usage: python scripts/fuzz_api.py [--markdown]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import test_bad_inputs as cat  # the catalogue

    groups = collections.OrderedDict()
    documented, unexpected = [], []
    for case in cat.CASES:
        group = case.api.split("(")[0].split("[")[0].split(".")[0]
        row = groups.setdefault(group, collections.Counter())
        for v in case.values():
            kind, detail = cat.outcome(case, v)
            row["tried"] += 1
            row[kind] += 1
            if kind == "clear":
                continue
            line = f"{case.api} {case.arg}={v!r}: {kind}: {detail}"
            if case.accepted(v):
                documented.append((kind, case.api, case.arg, v, case.accept_all or case.accept.get(repr(v), "")))
            else:
                unexpected.append(line)
    total = collections.Counter()
    for row in groups.values():
        total.update(row)
    cols = ("tried", "clear", "unclear", "accepted")
    if args.markdown:
        from lazyfast.bench import stamp

        st = stamp("python scripts/fuzz_api.py --markdown")
        print(f"# Bad-call catalogue ({st['date']}, commit {st['commit']}, torch {st['torch']})\n")
        print(f"`{st['command']}`: every fixed bad value of every entry of tests/test_bad_inputs.py's catalogue.\n")
        print("| API | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for g, row in list(groups.items()) + [("**total**", total)]:
            print(f"| {g} | " + " | ".join(str(row[c]) for c in cols) + " |")
    else:
        w = max(len(g) for g in groups) + 2
        print(f"{'API':<{w}}" + "".join(f"{c:>10}" for c in cols))
        for g, row in list(groups.items()) + [("total", total)]:
            print(f"{g:<{w}}" + "".join(f"{row[c]:>10}" for c in cols))
    if documented:
        print("\nNot a clear error, documented as acceptable (or pending elsewhere):")
        reasons = collections.OrderedDict()
        for kind, api, arg, v, why in documented:
            reasons.setdefault((kind, api, arg, why), []).append(v)
        for (kind, api, arg, why), vals in reasons.items():
            print(f"  {kind:<8} {api} {arg} in {vals}: {why}")
    if unexpected:
        print("\nUNEXPECTED (must be fixed):")
        for line in unexpected:
            print("  " + line)
    print(f"\n{total['tried']} bad calls: {total['clear']} clear errors, {total['unclear']} unclear, "
          f"{total['accepted']} silently accepted; {len(unexpected)} unexpected")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
