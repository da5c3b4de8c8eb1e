"""The tests' closeness rule is the package's own (lvrpo_fast.testing), so the trainer's --check-every and
the benchmarks' check cannot drift from it."""
from lvrpo_fast.testing import REF_FACTOR, TOLERANCES, assert_close_to_truth, closeness, compare_results  # noqa: F401
