"""Triton kernels for the kvpass ops (installed as ``kvpass.kernels``; imports only torch and triton).

Each kernel comes with its config space, launch wrapper, a test against the op's reference in
``kvpass.ops`` and a benchmark. The CPU path runs the references, so this package may be empty on
installs that only target CPU.
"""
