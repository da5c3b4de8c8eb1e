"""Where and when numbers were taken: device, CPU, versions, commit, load, environment.

The commit comes from git where the repository is a git checkout, else from the environment variable
LVRPO_COMMIT (a GPU machine is sent the working tree without .git: the caller passes the commit).
"""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

import torch

PACKAGES = ("torch", "triton", "lvrpo-fast", "liger-kernel", "cut-cross-entropy", "flash-attn", "pytest-benchmark")
ENV = ("LVRPO_CHUNK_BYTES", "TRITON_INTERPRET", "CI", "OMP_NUM_THREADS")


def load_average() -> Optional[str]:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def version(module: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def git(*args) -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None
    except Exception:
        return None


def commit() -> Optional[str]:
    """HEAD of the checkout, else LVRPO_COMMIT, else None."""
    return git("rev-parse", "HEAD") or os.environ.get("LVRPO_COMMIT") or None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(shape_set: str, device: torch.device, started: Optional[str] = None,
               load_start: Optional[str] = None) -> dict:
    status = git("status", "--porcelain", "--untracked-files=no") or ""
    return {
        "shape_set": shape_set,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in PACKAGES},
        "cuda": torch.version.cuda,
        "commit": commit(),
        # The code measured is the working tree's: name the tracked files that differ from the commit.
        "commit_dirty_files": [line.split(maxsplit=1)[-1] for line in status.splitlines() if line.strip()],
        "started_utc": started,
        "load_average_start": load_start,
        "env": {k: os.environ.get(k) for k in ENV},
    }
