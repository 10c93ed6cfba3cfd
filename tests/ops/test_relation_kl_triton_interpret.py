"""Runs triton_interpret_cases.py in a child pytest with TRITON_INTERPRET=1 (see that module)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from linearard.ops.functional import triton_available


# The CPU install leaves triton out (pip install -e ".[triton]" adds it); CI installs it to run these.
@pytest.mark.skipif(not triton_available(), reason='needs the triton package: pip install -e ".[triton]"')
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the checks run directly in this process")
def test_triton_kernels_under_the_interpreter():
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(here.parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "triton_interpret_cases.py")],
        cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
