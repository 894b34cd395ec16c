"""benchmarks/run_all.py on stand-in benchmark scripts (the real ones are heavy)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_all(folder: Path, out: Path, *extra: str) -> str:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--dir", str(folder), "--out", str(out),
                    *extra], check=True, capture_output=True)
    return out.read_text()


def test_run_all_collects_sections_names_the_machine_and_reports_failures(tmp_path):
    (tmp_path / "fast.py").write_text("print('| size | seconds |')\nprint('|---|---|')\nprint('| 64 | 0.5 |')\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('model file missing')\n")
    (tmp_path / "_helper.py").write_text("raise SystemExit('helpers are not benchmarks')\n")
    text = run_all(tmp_path, tmp_path / "BENCHMARKS.md")
    assert "## Test size" in text and "- CPU: " in text and "torch " in text and "- device: " in text
    assert "### fast" in text and "| 64 | 0.5 |" in text
    assert "### broken" in text and "exit code 1" in text and "model file missing" in text
    assert "_helper" not in text
    assert text.index("### broken") < text.index("### fast")


def test_the_sd15_size_runs_only_scripts_that_have_it_and_keeps_the_test_block(tmp_path):
    (tmp_path / "both.py").write_text("# sd15 arguments: --unet sd15 --size 512\nimport sys\n"
                                      "print('args:', ' '.join(sys.argv[1:]) or 'none')\n")
    (tmp_path / "test_only.py").write_text("print('test size only')\n")
    out = tmp_path / "BENCHMARKS.md"
    run_all(tmp_path, out)
    text = run_all(tmp_path, out, "--size", "sd15")
    test_block, sd15_block = text.split("## SD1.5 size")
    assert "args: none" in test_block and "test size only" in test_block
    assert "args: --unet sd15 --size 512" in sd15_block and "test_only" not in sd15_block
    assert "`python benchmarks/both.py --unet sd15 --size 512`" in sd15_block
    assert run_all(tmp_path, out).split("## SD1.5 size")[1] == sd15_block, "a test-size run keeps the sd15 block"


def test_a_size_runs_each_of_its_argument_lines_and_a_dry_run_writes_nothing(tmp_path):
    (tmp_path / "stages.py").write_text("# gpu arguments: --dtype fp32\n# gpu arguments: --dtype bf16\nimport sys\n"
                                        "print('args:', ' '.join(sys.argv[1:]))\n")
    out = tmp_path / "BENCHMARKS.md"
    dry = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--dir", str(tmp_path), "--out",
                          str(out), "--size", "gpu", "--dry"], check=True, capture_output=True, text=True).stdout
    assert "## GPU" in dry and "args: --dtype fp32 --dry" in dry and "args: --dtype bf16 --dry" in dry
    assert not out.exists(), "a dry run writes nothing"
