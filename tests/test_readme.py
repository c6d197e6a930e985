"""The README is a user's guide: short, and its Python example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_at_most_200_lines():
    assert len(README.splitlines()) <= 200


def test_the_python_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "the README has no Python example"
    (tmp_path / "docs").symlink_to(ROOT / "docs")       # the sample image it opens, by a relative path
    (tmp_path / "example.py").write_text(blocks[0])
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = tmp_path / "runs" / "example"
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()


def test_every_local_link_in_the_readme_exists():
    links = re.findall(r"\]\(((?!https?://)[^)#]+)\)", README)
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
