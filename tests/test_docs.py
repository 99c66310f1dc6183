"""Every code block of README.md and docs/*.md runs here or is marked as a sketch.

A ```python block runs in a folder holding what the docs name (a tiny finished run as runs/vits-ln and
runs/uni-ln, its merged model as uni-ln.safetensors). Any other block (shell commands that need real
data, GPUs or minutes, a sweep file) must be preceded by the line `<!-- sketch -->`, so that a reader
can tell what the tests vouch for.
"""

import os
import re
from pathlib import Path

import pytest

from lnshift.cli import main
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKETCH = "<!-- sketch -->"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def code_blocks() -> list[tuple[str, str, str, bool]]:
    """(where, language, code, marked as a sketch) of every fenced block with a language."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            before = text[: m.start()].rstrip("\n").rpartition("\n")[2].strip()
            where = f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            blocks.append((where, m.group(1), m.group(2), before == SKETCH))
    return blocks


PYTHON = [(where, code) for where, lang, code, sketch in code_blocks() if lang == "python" and not sketch]


def test_blocks_that_do_not_run_here_are_marked_sketches():
    assert len(code_blocks()) > 10 and PYTHON  # the blocks were found
    unmarked = [f"{where} ({lang})" for where, lang, _, sketch in code_blocks() if lang != "python" and not sketch]
    assert not unmarked, f"run these in tests/test_docs.py or precede them with {SKETCH}: {unmarked}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    run = root / "runs" / "vits-ln"
    assert main(["fit", *TINY, "--shots", "2", "--steps", "2", "--batch-size", "4", "--out", str(run)]) == 0
    os.symlink(run, root / "runs" / "uni-ln")
    assert main(["merge", str(run), "--out", str(root / "uni-ln.safetensors")]) == 0
    return root


@pytest.mark.parametrize(("where", "code"), PYTHON, ids=[where for where, _ in PYTHON])
def test_python_block_runs(where, code, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})
