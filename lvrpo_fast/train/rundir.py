"""The run directory (`--output-dir`, `runs/lvrpo` under the current directory by default):

    metrics.jsonl   one JSON row per step and per evaluation (rewritten from the checkpoint on --resume)
    checkpoints/    step_NNNNNN.safetensors (see checkpoints.py); unloadable/ holds files that did not load
    summary.json    the run's configuration and outcome, written at the end
    curves.png      the per-step curves, written at the end
    model/          the trained model and tokenizer (a Hugging Face folder, usable as --model)
    .lock           held while a run writes here (see RunLock)

A directory holding a previous run is refused unless --resume (continue it) or --overwrite (start
afresh) is given. Only rank 0 touches the directory.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from typing import List, Optional

try:
    import fcntl
except ImportError:  # not POSIX: runs on one directory are not guarded against each other
    fcntl = None

from .checkpoints import append_text, remove_leftovers

# The files of a previous run (their presence makes a directory "used").
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints")
# What --overwrite removes besides the checkpoints.
PREVIOUS_OUTPUTS = ("metrics.jsonl", "summary.json", "curves.png", "check_failure.txt")
MODEL_DIR = "model"


def output_dir_problem(path: str) -> Optional[str]:
    """Why `path` cannot be a run directory, found without creating anything (None when it can)."""
    real = os.path.realpath(path)
    for virtual in ("/proc", "/sys"):
        if real == virtual or real.startswith(virtual + "/"):
            return f"{path!r} lies on {virtual}, a virtual file system of the kernel; choose a directory on a disk"
    if os.path.exists(real) and not os.path.isdir(real):
        return f"{path!r} is a file, not a directory"
    ancestor = real
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{path!r} cannot be created: {ancestor!r} is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{path!r} is not writable ({ancestor!r} is not writable by this user)"
    return None


def make_writable_dir(path: str) -> None:
    """Creates `path` (and its parents) and proves it writable; raises ValueError naming --output-dir."""
    problem = output_dir_problem(path)
    if problem is not None:
        raise ValueError(f"--output-dir {problem}")
    probe = os.path.join(path, f".write_probe.tmp{os.getpid()}")  # a leftover is removed as one
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"--output-dir {path!r} is not writable: {exc.strerror or exc}") from None


class RunLock:
    """`.lock` in the run directory, held (flock, exclusive) for the whole run: a second run on the same
    directory refuses to start instead of interleaving its rows into metrics.jsonl.

    The kernel releases the lock when its process ends, however it ends (kill -9 included), so a lock
    left by a killed run is never stale: the file stays, the lock does not. The file's text names the
    holder (pid, host, start time) for the refusal message."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.fd: Optional[int] = None

    def acquire(self, command: str) -> None:
        if fcntl is None:
            print(f"lvrpo_fast.train: warning: cannot lock {self.path} (no flock on this platform); a second run "
                  f"on this directory would not be refused", file=sys.stderr)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise ValueError(f"--output-dir {os.path.dirname(self.path)!r} is in use by another run{holder}; "
                             f"wait for it to end, or choose another --output-dir") from None
        except OSError as exc:  # a file system without flock: run, but say what is not guarded
            os.close(fd)
            print(f"lvrpo_fast.train: warning: cannot lock {self.path} ({exc.strerror or exc}); a second run on "
                  f"this directory would not be refused", file=sys.stderr)
            return
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}).encode())
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f" (pid {info['pid']} on {info['host']}, started {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


class RunDir:
    """Rank 0's handle on the run directory: checks, lock, leftovers, previous runs, metrics rows."""

    def __init__(self, path: str):
        self.path = path
        self.checkpoints = os.path.join(path, "checkpoints")
        self.lock = RunLock(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def open(self, command: str, resume: bool, overwrite: bool, remove_checkpoints) -> List[str]:
        """Makes the directory, takes the lock, removes leftovers of killed writes, and applies the
        --resume / --overwrite rule. Returns notes for the user (leftovers removed)."""
        make_writable_dir(self.path)
        self.lock.acquire(command)
        notes = []
        for folder in (self.path, self.checkpoints):
            removed = remove_leftovers(folder)
            if removed:
                notes.append(f"lvrpo_fast.train: removed {len(removed)} temporary file(s) left by an interrupted "
                             f"write in {folder}: {', '.join(removed)}")
        previous = any(os.path.exists(self.file(n)) for n in RUN_FILES)
        if previous and not (resume or overwrite):
            raise ValueError(f"--output-dir {self.path} holds a previous run; pass --resume to continue it "
                             f"or --overwrite to start afresh")
        if previous and overwrite:
            for name in PREVIOUS_OUTPUTS:
                if os.path.exists(self.file(name)):
                    os.remove(self.file(name))
            if os.path.isdir(self.file(MODEL_DIR)):
                shutil.rmtree(self.file(MODEL_DIR))
            remove_checkpoints()
        os.makedirs(self.checkpoints, exist_ok=True)
        return notes

    def append_metrics(self, record: dict) -> None:
        append_text(json.dumps(record) + "\n", self.file("metrics.jsonl"))

    def close(self) -> None:
        self.lock.release()
