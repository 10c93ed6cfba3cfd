"""The README's first two commands are what CI runs, word for word."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_quick_start():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README has no Quick start bash block"
    install_and_run, run_tests = block.group(1).strip().splitlines()[:2]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_run in ci
    assert run_tests in ci
    assert install_and_run.endswith("linearard restore")


def test_the_cpu_install_pulls_no_gpu_only_package():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cpu = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = [re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in cpu]
    assert not [n for n in names if n == "triton" or n.startswith(("nvidia-", "cuda-"))]
    assert project["optional-dependencies"]["triton"]  # what a GPU user adds
