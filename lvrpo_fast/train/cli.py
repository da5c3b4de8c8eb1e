"""`python -m lvrpo_fast.train`: parse, run, and turn every way a run can end into an exit status and
one clear message (never a traceback for something the user can fix).

    0    finished (or --resume of a finished run)
    1    --check-every found the fused loss off, or the run directory could not be written (full disk)
    2    a bad flag or value, or an output directory that cannot be used (a file, unwritable, /proc,
         held by another run, holding a previous run without --resume / --overwrite)
    128 + N  stopped by signal N (130 for SIGINT, 143 for SIGTERM), with a checkpoint, or without
         one on a second signal

Nothing heavy is imported before the command line is parsed: `--help` and a bad flag cost torch's
import only (lvrpo_fast's own), not transformers' or matplotlib's.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import List, Optional

from . import model as M
from .check import FusedCheckError
from .checkpoints import RunDirError, atomic_write_text
from .config import parse_args
from .loop import Trainer

PROG = "python -m lvrpo_fast.train"
# Flags that must not be repeated when resuming (--overwrite would delete the run; --stop-after is a test aid).
_NOT_ON_RESUME = {"--overwrite": 0, "--no-overwrite": 0, "--resume": 0, "--no-resume": 0, "--stop-after": 1}


class Interrupted(BaseException):
    """A second SIGINT / SIGTERM: stop at once, without a checkpoint (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """SIGINT and SIGTERM while a run trains: the first asks the loop to stop at the next step boundary
    and save a checkpoint of the last finished step; a second raises Interrupted at once.

    A second signal within REPEAT_WINDOW_S of the first is the same request: torchrun forwards the
    signal it receives to its workers, which got the terminal's Ctrl-C already, so each worker sees
    one Ctrl-C twice within milliseconds."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_WINDOW_S = 2.0

    def __init__(self):
        self.signum: Optional[int] = None
        self.first_at = 0.0

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self.first_at < self.REPEAT_WINDOW_S:
                return
            raise Interrupted(signum)
        self.signum, self.first_at = signum, time.monotonic()
        if os.environ.get("RANK", "0") == "0":
            name = signal.Signals(signum).name
            print(f"\nlvrpo_fast.train: {name}: stopping after the step in progress, with a checkpoint "
                  f"(a second signal, after {self.REPEAT_WINDOW_S:g} s, stops at once, without one)", file=sys.stderr)


def launcher() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"torchrun --nproc_per_node {world} -m lvrpo_fast.train" if world > 1 else PROG


def command_line(argv: List[str]) -> str:
    """The command that started this run, as one shell line."""
    return " ".join([launcher()] + ([shlex.join(argv)] if argv else []))


def resume_command(argv: List[str]) -> str:
    """The command that continues this run: the same flags with --resume (without --overwrite)."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _NOT_ON_RESUME:
            skip = _NOT_ON_RESUME[name] if "=" not in arg else 0
            continue
        kept.append(arg)
    return command_line(kept + ["--resume"])


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2): argparse has said why
        return exc.code if isinstance(exc.code, int) else 2
    stop = StopRequest()
    trainer = None
    main_rank = os.environ.get("RANK", "0") == "0"
    with stop.installed(), M.transformers_progress(config.progress):
        try:
            try:
                trainer = Trainer(config, command_line(argv), stop)
            except ValueError as exc:  # bad values found while setting up, before any training
                _error(str(exc))
                return 2
            outcome = trainer.run()
        except FusedCheckError as exc:
            if trainer.procs.main:
                atomic_write_text(str(exc) + "\n", trainer.run_dir.file("check_failure.txt"))
            print(str(exc), file=sys.stderr)
            return 1
        except ValueError as exc:  # found on resume, before any step (a checkpoint past the last step)
            _error(str(exc))
            return 2
        except RunDirError as exc:
            _error(str(exc))
            return 1
        except Interrupted as exc:
            if main_rank:
                saved = None if trainer is None else trainer.saved_step
                where = "during setup" if trainer is None else f"during step {trainer.step + 1}"
                kept = ("the newest checkpoint is step " + str(saved) + "; resume with: " + resume_command(argv)
                        if saved is not None else "no checkpoint was written; start again with --overwrite")
                print(f"lvrpo_fast.train: stopped by {signal.Signals(exc.signum).name} {where}, without saving; "
                      f"{kept}", file=sys.stderr)
            return 128 + exc.signum
        finally:
            if trainer is not None:
                trainer.close()
    if "stopped_by" in outcome:
        if main_rank:
            print(f"lvrpo_fast.train: stopped by {signal.Signals(outcome['stopped_by']).name} after step "
                  f"{outcome['step']} of {config.total_steps}, checkpoint saved; resume with: {resume_command(argv)}",
                  file=sys.stderr)
        return 128 + outcome["stopped_by"]
    return 0
