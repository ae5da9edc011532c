"""``pyebm._kernels`` when pyebm runs from a source checkout.

An install maps the top-level folder ``kernels/`` to the package ``pyebm._kernels`` (setup.py's
``package_dir``; an editable install does the same with an import hook). A checkout used in place (the
extension built by ``python setup.py build_ext --inplace``, the repository root on ``sys.path``, as
``bench/gpu_suite.sh`` runs it) has no such mapping. This adds a finder, consulted after every other one,
that maps that name to ``kernels/`` of the same checkout. Nothing is imported until the kernels are.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

NAME = "pyebm._kernels"


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(fullname, self.folder / "__init__.py",
                                                      submodule_search_locations=[str(self.folder)])


def install_finder() -> None:
    """Register the finder when this package sits in a checkout (``setup.py`` and ``kernels/`` beside it)."""
    root = Path(__file__).resolve().parent.parent
    folder = root / "kernels"
    if not ((root / "setup.py").is_file() and (folder / "__init__.py").is_file()):
        return
    if any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
        return
    sys.meta_path.append(_CheckoutKernelsFinder(folder))
