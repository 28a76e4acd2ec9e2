"""node/_gen/ must be exactly what proto/ generates: a stale copy fails here."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _differences(left: filecmp.dircmp[str]) -> list[str]:
    found = [*left.left_only, *left.right_only, *left.diff_files]
    for sub in left.subdirs.values():
        found += _differences(sub)
    return found


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(REPO / "scripts/gen_proto.sh"), str(tmp_path)], env=env, check=True,
                   capture_output=True)
    comparison = filecmp.dircmp(tmp_path, REPO / "node/_gen", ignore=["__pycache__"])
    assert _differences(comparison) == [], "node/_gen/ is stale: run `make proto` and commit it"
