"""Every notebook's own tests, run by `nbdev-test` as CI runs them, one notebook per test: they run in parallel with the
rest of the suite (pytest-xdist) instead of before it."""
import os, subprocess, sys
from pathlib import Path
import pytest
from conftest import ROOT

NBDEV_TEST = Path(sys.executable).parent / "nbdev-test"
NOTEBOOKS = sorted(p.name for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))


def test_every_notebook_is_here():
    assert "05_pipeline.ipynb" in NOTEBOOKS and "20_cli.ipynb" in NOTEBOOKS and len(NOTEBOOKS) >= 16


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_notebook(nb):
    env = {k: v for k, v in os.environ.items() if k != "MLNB_PROJECT"}
    p = subprocess.run([str(NBDEV_TEST), str(ROOT / "nbs" / nb)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"nbdev-test {nb} failed:\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
