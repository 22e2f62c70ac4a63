"""The README's Python snippets run as written (on the CPU here; issue 15: "the README's
snippets run as written"). A snippet whose comment says "continuing the quick start" runs
after the ones before it, in one process; every other snippet runs on its own."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _programs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    programs = []
    for block in blocks:
        if "continuing the quick start" in block.splitlines()[0] and programs:
            programs[-1] += "\n" + block
        else:
            programs.append(block)
    return programs


def test_the_readme_has_its_snippets():
    # quick start (+ IRRA, + reference), testing your own implementation, training, multi-GPU
    assert len(_programs()) == 4, [p.splitlines()[0] for p in _programs()]


@pytest.mark.parametrize("index", range(4))
def test_readme_snippet_runs(index, tmp_path):
    program = _programs()[index]
    path = tmp_path / f"snippet_{index}.py"
    path.write_text(program)
    # the installed package, as a user runs it (from a directory outside the repository)
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
