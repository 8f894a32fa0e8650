"""Replaces the `lazyfast bench --quick` table in README.md with a fresh result file:

    python -m lazyfast.cli bench --quick --markdown benchmarks/results/bench-quick-cpu.md
    python scripts/update_readme_bench.py [benchmarks/results/bench-quick-cpu.md]
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
START, END = "<!-- bench-quick:start -->", "<!-- bench-quick:end -->"


def main(path="benchmarks/results/bench-quick-cpu.md"):
    table = (ROOT / path).read_text().strip()
    readme = (ROOT / "README.md").read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} … {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    (ROOT / "README.md").write_text(f"{head}{START}\n{table}\n{END}{tail}")
    print(f"README.md: bench table replaced from {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
