"""`python -m lvrpo_fast.train` (and `torchrun --nproc_per_node N -m lvrpo_fast.train`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
