"""README.md's Python blocks run as written, top to bottom in one namespace (as a reader would paste them).

A block fenced as ```python no-run is shown and not run (the README says where it is tested instead)."""
import pathlib
import re
import sys
import types

import pytest

import pyebm

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 5


@pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")
def test_readme_python_blocks_run(monkeypatch):
    # The blocks run in a module that can be imported, as a reader's script would (Dynamo in torch 2.11
    # imports the module named by a traced function's globals).
    module = types.ModuleType("readme")
    monkeypatch.setitem(sys.modules, "readme", module)
    namespace = module.__dict__
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python block {i} failed:\n{block}") from exc
