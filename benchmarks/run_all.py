"""Runs the benchmark scripts and writes BENCHMARKS.md.

Every other `*.py` file in this folder is a benchmark: it prints one markdown section
to stdout. This harness runs each in a fresh interpreter, names the machine the figures
came from, and writes the sections in order. Figures are only ever what the scripts
measured on this run; a script that fails gets a section saying so, with its error.

Three sizes: ``test`` (the test-size models, minutes on a CPU) runs every script; ``sd15``
(SD1.5's full-size UNet at 512 px, for a GPU or a patient CPU) and ``gpu`` (the same on
CUDA, fp32 and bf16: benchmarks/gpu.sh) run the scripts that carry lines
``# sd15 arguments: ...`` / ``# gpu arguments: ...``, once per line, with those arguments.
Each size has its own block in BENCHMARKS.md, with its own date and machine; a run rewrites
its size's block only. ``--dry`` passes ``--dry`` to every script (a tiny run on the CPU
that checks the scripts work), prints the block instead of writing BENCHMARKS.md, and exits
with status 1 when a script failed.

    .venv/bin/python benchmarks/run_all.py [--size sd15] [--only inversion_modes ...] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines() -> list[str]:
    """Where the figures come from, as a markdown list."""
    import torch

    device = f"CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    return [f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores (torch uses {torch.get_num_threads()} threads)",
            f"- device: {device}",
            f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}"]


SIZES = {"test": "Test size: the test-size models", "sd15": "SD1.5 size: SD1.5's full-size UNet at 512 px",
         "gpu": "GPU: SD1.5's full-size UNet at 512 px on CUDA"}


def size_arguments(script: Path, size: str) -> list[list[str]]:
    """The script's runs for this size, one argument list each; none when it has no such size."""
    if size == "test":
        return [[]]
    marker = re.compile(rf"^# {size} arguments: (.+)$", re.MULTILINE)
    return [shlex.split(found) for found in marker.findall(script.read_text())]


def benchmark_scripts(folder: Path, only: list[str] | None, size: str) -> list[Path]:
    scripts = sorted(p for p in folder.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")
                     and size_arguments(p, size))
    if only:
        missing = set(only) - {p.stem for p in scripts}
        if missing:
            raise SystemExit(f"no such benchmark in {folder}: {', '.join(sorted(missing))}")
        scripts = [p for p in scripts if p.stem in only]
    return scripts


def run_benchmark(script: Path, arguments: list[str], timeout: float) -> str:
    """The script's markdown section, or a section reporting why there is none."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(script), *arguments], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"_Not measured: stopped after {timeout:.0f} s._\n"
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return f"_Not measured: exit code {done.returncode}._\n\n```\n{tail}\n```\n"
    return f"{done.stdout.rstrip()}\n\n_(ran in {seconds:.0f} s)_\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="benchmark script stems to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--dir", type=Path, default=HERE, help="folder of benchmark scripts")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per script")
    parser.add_argument("--size", choices=list(SIZES), default="test")
    parser.add_argument("--dry", action="store_true", help="tiny CPU runs that check the scripts; print, write nothing")
    args = parser.parse_args(argv)
    scripts = benchmark_scripts(args.dir, args.only, args.size)
    lines = [f"## {SIZES[args.size]}", "", f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
             f"`benchmarks/run_all.py --size {args.size}`; every figure in this part is what that run measured, on:",
             ""]
    lines += machine_lines() + [""]
    for script in scripts:
        for arguments in size_arguments(script, args.size):
            arguments = arguments + ["--dry"] if args.dry else arguments
            print(f"running {script.name} {' '.join(arguments)} ...", file=sys.stderr, flush=True)
            command = " ".join(["python", f"benchmarks/{script.name}", *arguments])
            lines += [f"### {script.stem}", "", f"`{command}`", "", run_benchmark(script, arguments, args.timeout)]
    if args.dry:
        print("\n".join(lines))
        failed = [line for line in lines if line.startswith("_Not measured")]
        return 1 if failed else 0  # a dry run is a check: a script that failed fails it
    blocks = size_blocks(args.out.read_text() if args.out.exists() else "")
    blocks[args.size] = "\n".join(lines)
    args.out.write_text("# Benchmarks\n\n" + "\n".join(blocks[size] for size in SIZES if size in blocks))
    print(args.out)
    return 0


def size_blocks(text: str) -> dict[str, str]:
    """The blocks of an existing BENCHMARKS.md, by size (a file without blocks has none)."""
    titles = {f"## {title}": size for size, title in SIZES.items()}
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = titles.get(line)
        if current is not None:
            blocks.setdefault(current, []).append(line)
    return {size: "\n".join(lines) + "\n" for size, lines in blocks.items()}


if __name__ == "__main__":
    raise SystemExit(main())
