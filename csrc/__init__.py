"""The C++ sources of the CPU backend, installed as ``lvrpo_fast.csrc`` so that
lvrpo_fast/backends/cpp.py finds them in a wheel and in an editable install alike (no Python here)."""
