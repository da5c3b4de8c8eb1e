"""Kept for tools that look for setup.py; all metadata lives in pyproject.toml.

The C++ CPU backend (csrc/) is not compiled here: it is built on first use with ninja through
torch.utils.cpp_extension and cached (see lvrpo_fast/backends/cpp.py), so installing never needs
torch inside an isolated build environment and never fails for want of a compiler.
"""
from setuptools import setup

setup()
