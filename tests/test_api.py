"""The README's Python API example, run as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_python_api_example_in_readme_runs(tmp_path):
    """The README's Python example, executed as written (with the tiny test backbone swapped in)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('parse_weights("random")', 'parse_weights("random"), backbone="tiny"')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert Path("cache/api/predictions.csv").is_file() and namespace["report"].val_acc >= 0
