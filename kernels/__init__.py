"""Triton kernels for the kvpass ops (installed as ``kvpass.kernels``; imports only torch and triton).

Each kernel comes with its config space, launch wrapper, a test against the op's reference in
``kvpass.ops`` and a benchmark. The CPU path runs the references, so this package may be empty on
installs that only target CPU.
"""

if __name__ == "kernels":
    # Python was started at the repository root, so this folder shadows the PyPI package "kernels" (transformers'
    # hub-kernels integration imports it). Hand that import the real package: Python's import returns whatever
    # sys.modules holds for the name once this module body has run.
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    finally:
        sys.path[:] = _saved
