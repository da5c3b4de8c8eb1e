"""Checkpoint files and the RNG states they carry.

A checkpoint is one safetensors file, `checkpoints/step_000123.safetensors`:
    tensors   every tensor of the state (weights, optimizer moments, RNG states), named by its path
    metadata  "lvrpo_state"   the rest of the state as JSON, {"__tensor__": name} where a tensor was
              "lvrpo_sha256"  SHA-256 of the JSON text and of every tensor's name, dtype, shape and bytes
              "lvrpo_format"  FORMAT
Loading reads JSON and raw tensor bytes only, never a pickle (nothing in an output directory can run
code), and recomputes the checksum, so a flipped bit anywhere in the file fails the load with a reason.

Files are written atomically (a temporary file in the same folder, fsync, rename): a reader sees the
old file or the whole new one. A full disk raises RunDirError naming the folder and the bytes
needed, after removing the temporary file. Leftover temporary files of a killed writer are removed by
:func:`remove_leftovers` at the next start.

Which checkpoint is the newest is decided by write order (a serial number inside the file), among
the files that load; files that do not load are moved to `checkpoints/unloadable/` with a warning,
never ranked, never resumed from, and never the reason a good checkpoint is pruned.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

FORMAT = "2"
PATTERN = re.compile(r"step_(\d+)\.safetensors")
UNLOADABLE = "unloadable"
# Written by lvrpo_fast before FORMAT 2: pickles, which are never loaded (unpickling can run code).
LEGACY = re.compile(r"step_(\d+)\.pt")
_TMP = re.compile(r"\..+\.tmp\d+")


class RunDirError(RuntimeError):
    """The run directory cannot be written (a full disk, ...); the message says where and what is needed."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
def _write_all(f, data: bytes) -> None:
    f.write(data)


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors' writer (used by transformers' save_pretrained) wraps the OS error in its own type.
    return isinstance(exc, Exception) and ("No space left on device" in str(exc) or "Disk quota exceeded" in str(exc))


def _disk_full_error(path: str, needed: int) -> RunDirError:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(folder).free} bytes are free"
    except OSError:
        free = "the free space is unknown"
    return RunDirError(f"no space left on the device of {folder}: writing {os.path.basename(path)} needs "
                       f"{needed} bytes, {free}; free some space, then resume with --resume")


def tmp_path(path: str, tag: str = "") -> str:
    """The temporary name `path` is written under (hidden, in the same folder, tagged with the pid)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{tag}.tmp{os.getpid()}")


def atomic_write(data: bytes, path: str) -> None:
    """Writes `data` to `path` so that a reader sees the old file or the whole new one, never a torn
    one; on any failure (a full disk, a signal) the temporary file is removed."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if _disk_full(exc):
            raise _disk_full_error(path, len(data)) from None
        raise
    _fsync_folder(os.path.dirname(path) or ".")


def atomic_write_folder(write: Callable[[str], None], path: str, size_hint: int) -> None:
    """`write(folder)` fills a temporary folder that then replaces `path` (a reader sees the old folder
    or the whole new one, save for the instant between two renames); on failure it is removed.
    size_hint: about how many bytes the folder takes, for the full-disk message."""
    tmp = tmp_path(path)
    old = tmp_path(path, ".old")
    try:
        write(tmp)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            raise _disk_full_error(path, size_hint) from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(text.encode(), path)


def append_text(text: str, path: str) -> None:
    """Appends `text` to `path`; on a full disk the partial write is cut off again before raising."""
    data = text.encode()
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "ab") as f:
            _write_all(f, data)
            f.flush()
    except OSError as exc:
        if not _disk_full(exc):
            raise
        os.truncate(path, size)
        raise _disk_full_error(path, len(data)) from None


def _fsync_folder(folder: str) -> None:
    """Makes a rename in `folder` durable (not possible on every file system: then skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_leftovers(folder: str) -> List[str]:
    """Removes the temporary files a killed writer left in `folder`; returns their names. Call it only
    while holding the run directory's lock (a live writer's temporary file must not be removed)."""
    removed = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if _TMP.fullmatch(name):
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
                removed.append(name)
    return removed


# ----------------------------------------------------------------------------------------------
# The state as JSON plus tensors
# ----------------------------------------------------------------------------------------------
def _encode(obj, path: str, tensors: Dict[str, torch.Tensor]):
    """`obj` as JSON-ready data; its tensors go to `tensors` under their path. Tuples, dicts with
    non-string keys and numpy arrays are tagged so that :func:`_decode` gives them back exactly."""
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"checkpoint: two tensors at {path!r}")
        # A copy: tied weights share storage, which safetensors refuses to write twice.
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        # Unsigned words (numpy's Mersenne Twister state) travel as int64: exact, and a dtype every
        # safetensors version knows.
        array = obj.astype(np.int64) if obj.dtype.kind == "u" else obj
        _encode(torch.from_numpy(np.ascontiguousarray(array)), path, tensors)
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{path}/key{i}", tensors), _encode(v, f"{path}/{k}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {path!r}")


def _decode(obj, tensors: Dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _checksum(text: str, tensors: Dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def serialize(state: Dict) -> bytes:
    """The checkpoint file's bytes for `state` (nested dicts / lists / tuples of tensors, numpy arrays,
    numbers, strings)."""
    from safetensors.torch import save  # imported on use: --help and flag errors answer without it

    tensors: Dict[str, torch.Tensor] = {}
    text = json.dumps(_encode(state, "state", tensors))
    metadata = {"lvrpo_format": FORMAT, "lvrpo_state": text, "lvrpo_sha256": _checksum(text, tensors)}
    return save(tensors, metadata=metadata)


def deserialize(data: bytes, name: str = "checkpoint") -> Dict:
    """The state of a checkpoint file's bytes; raises CheckpointError naming `name` and the reason."""
    from safetensors.torch import load

    try:
        (header_size,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{name}: not a safetensors file ({exc})") from None
    if metadata.get("lvrpo_format") != FORMAT:
        raise CheckpointError(f"{name}: not an lvrpo_fast checkpoint of format {FORMAT} "
                              f"(format {metadata.get('lvrpo_format')!r})")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for a damaged body
        raise CheckpointError(f"{name}: damaged tensor data ({type(exc).__name__}: {exc})") from None
    text = metadata.get("lvrpo_state", "")
    if _checksum(text, tensors) != metadata.get("lvrpo_sha256"):
        raise CheckpointError(f"{name}: checksum mismatch (the file changed after it was written)")
    try:
        return _decode(json.loads(text), tensors)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{name}: damaged state ({type(exc).__name__}: {exc})") from None


def load(path: str) -> Dict:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return deserialize(data, path)


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> Dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# The checkpoints folder
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    serial: int  # write order: the newest checkpoint has the highest serial
    step: int
    path: str


class CheckpointFolder:
    """`checkpoints/` of a run directory, kept by rank 0: the loadable checkpoints in write order,
    pruned to the newest `keep`."""

    def __init__(self, folder: str, keep: int):
        self.folder, self.keep = folder, keep
        self.entries: List[Entry] = []  # newest first

    def path_of(self, step: int) -> str:
        return os.path.join(self.folder, f"step_{step:06d}.safetensors")

    def scan(self, warn: Callable[[str], None]) -> List[Tuple[str, str]]:
        """Loads every checkpoint file to find those that load; moves the others (and pickles of the
        old format) to unloadable/ with a warning. Returns [(name, reason)] of the files moved."""
        moved, entries = [], []
        for name in sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []:
            path = os.path.join(self.folder, name)
            if PATTERN.fullmatch(name):
                try:
                    state = load(path)
                    entries.append(Entry(int(state["serial"]), int(state["step"]), path))
                    continue
                except (CheckpointError, KeyError, TypeError, ValueError) as exc:
                    reason = str(exc).removeprefix(f"{path}: ")
            elif LEGACY.fullmatch(name):
                reason = "written by an older lvrpo_fast as a pickle, which is never loaded (unpickling can run code)"
            else:
                continue
            target = self._move_aside(path)
            warn(f"lvrpo_fast.train: warning: checkpoint {path} cannot be loaded ({reason}); moved to {target}")
            moved.append((name, reason))
        self.entries = sorted(entries, key=lambda e: e.serial, reverse=True)
        return moved

    def _move_aside(self, path: str) -> str:
        folder = os.path.join(self.folder, UNLOADABLE)
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, os.path.basename(path))
        n = 1
        while os.path.exists(target):
            target = os.path.join(folder, f"{os.path.basename(path)}.{n}")
            n += 1
        os.replace(path, target)
        return target

    def newest(self) -> Optional[Entry]:
        return self.entries[0] if self.entries else None

    def save(self, state: Dict) -> str:
        """Writes `state` (with its write serial added) as the newest checkpoint, then prunes the
        oldest beyond `keep`; returns the path."""
        serial = self.entries[0].serial + 1 if self.entries else 1
        path = self.path_of(state["step"])
        atomic_write(serialize({**state, "serial": serial}), path)
        self.entries = [Entry(serial, state["step"], path)] + [e for e in self.entries if e.path != path]
        for old in self.entries[self.keep:]:
            if os.path.exists(old.path):
                os.remove(old.path)
        self.entries = self.entries[:self.keep]
        return path

    def remove_all(self) -> None:
        """--overwrite: every checkpoint, loadable or not, and any leftover."""
        if not os.path.isdir(self.folder):
            return
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if PATTERN.fullmatch(name) or LEGACY.fullmatch(name) or _TMP.fullmatch(name):
                os.remove(path)
            elif name == UNLOADABLE:
                shutil.rmtree(path)
        self.entries = []
