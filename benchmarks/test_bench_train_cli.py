"""How long the trainer's command line takes to answer `--help`, in a fresh interpreter each round.

`python -m lvrpo_fast.train --help` parses before it imports anything beyond lvrpo_fast itself
(transformers, matplotlib and the trainer's loop come after parsing; tests/test_train.py checks that
they stay out). Its floor is `import lvrpo_fast`, i.e. torch's import, timed beside it for the
comparison. Under --benchmark-disable (CI) each runs once, untimed, and must still succeed.
"""
import subprocess
import sys

import pytest

COMMANDS = {
    "train --help": [sys.executable, "-m", "lvrpo_fast.train", "--help"],
    "import lvrpo_fast (the floor)": [sys.executable, "-c", "import lvrpo_fast"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_train_cli_help(benchmark, name):
    command = COMMANDS[name]

    def run():
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if "--help" in command:
            assert proc.stdout.startswith("usage: python -m lvrpo_fast.train")

    benchmark.extra_info["command"] = " ".join(command[1:])
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
