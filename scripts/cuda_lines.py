"""Counts the CUDA-only lines (non-blank, non-comment) and writes the table of docs/gpu.md.

    python scripts/cuda_lines.py            # rewrite the table between the markers in docs/gpu.md
    python scripts/cuda_lines.py --check    # exit 1 if the table and the sources disagree

The files that only a CUDA build compiles: csrc/cuda/* and csrc/include/lazyfast/cuda_launch.h.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "gpu.md"
START, END = "<!-- cuda-lines:start -->", "<!-- cuda-lines:end -->"


def cuda_files(root: pathlib.Path = ROOT):
    files = sorted((root / "csrc" / "cuda").glob("*")) + [root / "csrc" / "include" / "lazyfast" / "cuda_launch.h"]
    return [f for f in files if f.is_file()]


def code_lines(text: str) -> int:
    """Non-blank lines that are not // comments (the count the table states)."""
    return sum(1 for line in text.splitlines() if line.strip() and not re.match(r"^\s*//", line))


def table(root: pathlib.Path = ROOT) -> str:
    rows = [(f.relative_to(root).as_posix(), code_lines(f.read_text())) for f in cuda_files(root)]
    lines = ["Counted by `python scripts/cuda_lines.py` (non-blank lines that are not `//` comments):", "",
             "| file | lines |", "|---|---:|"]
    lines += [f"| `{name}` | {n} |" for name, n in rows]
    lines.append(f"| **total** | **{sum(n for _, n in rows)}** |")
    return "\n".join(lines)


def count_at(rev: str, root: pathlib.Path = ROOT):
    """The same total at git revision ``rev`` (None where the tree is not a git checkout)."""
    import subprocess

    try:
        names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "csrc/cuda",
                                "csrc/include/lazyfast/cuda_launch.h"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.split()
        return sum(code_lines(subprocess.run(["git", "show", f"{rev}:{n}"], cwd=root, capture_output=True, text=True,
                                             check=True).stdout) for n in names)
    except (OSError, subprocess.CalledProcessError):
        return None


def render(doc: str) -> str:
    i, j = doc.index(START) + len(START), doc.index(END)
    return doc[:i] + "\n" + table() + "\n" + doc[j:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    doc = DOC.read_text()
    new = render(doc)
    if args.check:
        if new != doc:
            print("docs/gpu.md: the CUDA-only line table is stale; run python scripts/cuda_lines.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
