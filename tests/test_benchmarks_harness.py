"""benchmarks/run_all.py on two stand-in benchmark scripts (the real ones are heavy)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_run_all_collects_sections_names_the_machine_and_reports_failures(tmp_path):
    (tmp_path / "fast.py").write_text("print('| size | seconds |')\nprint('|---|---|')\nprint('| 64 | 0.5 |')\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('model file missing')\n")
    (tmp_path / "_helper.py").write_text("raise SystemExit('helpers are not benchmarks')\n")
    out = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--dir", str(tmp_path),
                    "--out", str(out)], check=True, capture_output=True)
    text = out.read_text()
    assert "## Machine" in text and "- CPU: " in text and "torch " in text and "- device: " in text
    assert "## fast" in text and "| 64 | 0.5 |" in text
    assert "## broken" in text and "exit code 1" in text and "model file missing" in text
    assert "_helper" not in text
    assert text.index("## broken") < text.index("## fast")
