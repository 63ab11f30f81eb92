"""Checks the OUT folder of ``benchmarks/gpu_check.sh`` against what the GPU machine returns
(its limits: one command <= 600 s, no network): at most 8 files, each under 16 MiB and 64 MiB
together, at most two folders deep, names of letters, digits, ``.``, ``_`` and ``-``, plain
files only. And the layout the script promises: ``summary.txt`` whose first line is the
check's header, ``results.json`` from ``ppokernels bench``, ``report.md`` and ``logs.tar.gz``,
a readable archive.

    python benchmarks/check_gpu_out.py OUT     exit 0 and the listing, or 1 and the problems
"""

from __future__ import annotations

import json
import re
import sys
import tarfile
from pathlib import Path

MAX_FILES, MAX_FILE_BYTES, MAX_TOTAL_BYTES, MAX_FOLDERS_DEEP = 8, 16 * 2**20, 64 * 2**20, 2
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
EXPECTED = ("summary.txt", "results.json", "report.md", "logs.tar.gz")
HEADER = "ppokernels GPU check"


def problems(out: Path) -> list[str]:
    """Every way ``out`` breaks the limits or the layout (empty when it is fine)."""
    if not out.is_dir():
        return [f"{out} is not a folder"]
    found, files = [], []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not all(NAME.match(part) for part in rel.parts):
            found.append(f"{rel}: a name outside [A-Za-z0-9._-]")
        if len(rel.parts) - 1 > MAX_FOLDERS_DEEP:
            found.append(f"{rel}: more than {MAX_FOLDERS_DEEP} folders deep")
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            found.append(f"{rel}: not a plain file")
        elif path.is_file():
            files.append(path)
            if path.stat().st_size >= MAX_FILE_BYTES:
                found.append(f"{rel}: {path.stat().st_size} bytes, not under 16 MiB")
    if len(files) > MAX_FILES:
        found.append(f"{len(files)} files, more than {MAX_FILES}")
    if sum(p.stat().st_size for p in files) > MAX_TOTAL_BYTES:
        found.append("more than 64 MiB together")
    for name in EXPECTED:
        if not (out / name).is_file():
            found.append(f"{name} missing")
    if (out / "summary.txt").is_file():
        first = (out / "summary.txt").read_text(errors="replace").partition("\n")[0]
        if not first.startswith(HEADER):
            found.append(f"summary.txt does not start with {HEADER!r}: {first[:80]!r}")
    if (out / "results.json").is_file():
        try:
            res = json.loads((out / "results.json").read_text())
            if not ({"machine", "results", "failures"} <= set(res) or "error" in res):
                found.append("results.json holds neither results nor an error")
        except ValueError as e:
            found.append(f"results.json is not JSON: {e}")
    if (out / "logs.tar.gz").is_file():
        try:
            with tarfile.open(out / "logs.tar.gz") as tar:
                if not any(n.startswith("logs/") for n in tar.getnames()):
                    found.append("logs.tar.gz holds no logs/")
        except tarfile.TarError as e:
            found.append(f"logs.tar.gz is not a readable archive: {e}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/check_gpu_out.py OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    found = problems(out)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>10}  {path.relative_to(out)}")
    for p in found:
        print(f"check_gpu_out: {p}", file=sys.stderr)
    print("check_gpu_out: " + ("FAILED" if found else "ok"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
