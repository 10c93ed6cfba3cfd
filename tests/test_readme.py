"""The README's first two commands are what CI runs, word for word."""

import re
from pathlib import Path

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
