"""Compares ``lazyfast bench --quick`` results of two trees, run in interleaved rounds (A B A B ...):
per workload and implementation, the time ratio after / before in each round, its median and range.

    python scripts/compare_bench_quick.py DIR   # DIR holds before-<r>.json and after-<r>.json

Writes DIR/compare.json and DIR/compare.md (the house's "bench --quick unchanged" check).
"""
import glob
import json
import os
import statistics
import sys


def main(argv=None) -> int:
    d = (argv or sys.argv[1:])[0]
    rounds = sorted({os.path.basename(p).split("-")[1].split(".")[0] for p in glob.glob(os.path.join(d, "before-*.json"))})
    load = lambda side, r: json.load(open(os.path.join(d, f"{side}-{r}.json")))  # noqa: E731
    runs = {r: (load("before", r), load("after", r)) for r in rounds}
    keys = [(row["workload"], row["implementation"]) for row in runs[rounds[0]][0]["rows"]]
    out = []
    for wl, impl in keys:
        ratios, agree = [], True
        for r in rounds:
            b, a = ({(x["workload"], x["implementation"]): x for x in side["rows"]} for side in runs[r])
            ratios.append(a[(wl, impl)]["seconds"] / b[(wl, impl)]["seconds"])
            agree = agree and a[(wl, impl)]["agrees"] and b[(wl, impl)]["agrees"]
        out.append(dict(workload=wl, implementation=impl, ratios=ratios, median=statistics.median(ratios),
                        min=min(ratios), max=max(ratios), agrees=agree))
    meta = {side: [runs[r][i]["machine"] for r in rounds] for i, side in enumerate(("before", "after"))}
    stamp = {k: meta["after"][0].get(k) for k in ("machine", "torch", "threads", "date")}
    res = dict(rounds=rounds, order="before-1, after-1, before-2, after-2, ... (interleaved)",
               commits={s: sorted({m["commit"] for m in meta[s]}) for s in meta},
               load_avg={s: [m["load_avg"] for m in meta[s]] for s in meta}, stamp=stamp, rows=out)
    with open(os.path.join(d, "compare.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"*`lazyfast bench --quick`, before ({', '.join(res['commits']['before'])}) and after "
             f"({', '.join(res['commits']['after'])}) the house's restructuring, {len(rounds)} interleaved rounds "
             f"(before, after, before, after); {stamp['machine']}, torch {stamp['torch']}, {stamp['threads']} threads, "
             f"{stamp['date']}. Time ratio after / before: median of the rounds [min–max].*", "",
             "| workload | implementation | after / before | all agree |", "|---|---|---:|---|"]
    for row in out:
        lines.append(f"| {row['workload']} | {row['implementation']} | {row['median']:.2f} "
                     f"[{row['min']:.2f}–{row['max']:.2f}] | {'yes' if row['agrees'] else 'NO'} |")
    with open(os.path.join(d, "compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
