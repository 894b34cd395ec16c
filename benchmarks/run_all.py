"""Runs the benchmark scripts and writes BENCHMARKS.md.

Every other `*.py` file in this folder is a benchmark: it prints one markdown section
to stdout. This harness runs each in a fresh interpreter, names the machine the figures
came from, and writes the sections in order. Figures are only ever what the scripts
measured on this run; a script that fails gets a section saying so, with its error.

    .venv/bin/python benchmarks/run_all.py [--only inversion_modes ...] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import platform
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


def benchmark_scripts(folder: Path, only: list[str] | None) -> list[Path]:
    scripts = sorted(p for p in folder.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    if only:
        missing = set(only) - {p.stem for p in scripts}
        if missing:
            raise SystemExit(f"no such benchmark in {folder}: {', '.join(sorted(missing))}")
        scripts = [p for p in scripts if p.stem in only]
    return scripts


def run_benchmark(script: Path, timeout: float) -> str:
    """The script's markdown section, or a section reporting why there is none."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
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
    args = parser.parse_args(argv)
    scripts = benchmark_scripts(args.dir, args.only)
    lines = ["# Benchmarks", "", f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
             "`benchmarks/run_all.py`; every figure below is what that run measured.", "", "## Machine", ""]
    lines += machine_lines() + [""]
    for script in scripts:
        print(f"running {script.name} ...", file=sys.stderr, flush=True)
        lines += [f"## {script.stem}", "", f"`python benchmarks/{script.name}`", "", run_benchmark(script, args.timeout)]
    args.out.write_text("\n".join(lines))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
