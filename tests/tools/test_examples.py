"""The examples shipped in the repository run and say what they claim."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_resumes_bitwise_identically(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "quickstart.py"),
            "--dir",
            str(tmp_path / "run"),
            "--steps",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bitwise identical" in result.stdout
    assert os.path.exists(tmp_path / "run" / "snapshots" / "000000000006" / "commit.json")
