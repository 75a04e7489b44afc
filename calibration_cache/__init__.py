"""The on-disk store of fitted calibrations: safetensors files with JSON metadata.

Writes are atomic (a temporary file in the same folder, flushed and fsynced, then os.replace), so a
crash or a killed process leaves the previous file or none, never a torn one. Each file carries a
SHA-256 of its metadata and tensor bytes, so a truncated, bit-flipped or hand-edited file is refused.
Loading reads only tensors and JSON (safetensors never unpickles) and validates the record; a damaged
file raises CalibrationFileError with the file name and what is wrong. Names built from user text are reduced to
a safe file name inside the folder.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import torch

from ..optimizers.calibration import Calibration

SUFFIX = ".safetensors"
CHECKSUM_KEY = "sha256"


class CalibrationFileError(ValueError):
    pass


def safe_name(text: str) -> str:
    """A file name from user text: no folders, no leading dots, only [A-Za-z0-9._-]."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(text)).name).lstrip("._")[:120]
    if not name:
        raise ValueError(f"{text!r} is not usable as a calibration name")
    return name if name.endswith(SUFFIX) else name + SUFFIX


def path_for(folder, name: str) -> Path:
    folder = Path(folder).resolve()
    path = (folder / safe_name(name)).resolve()
    if path.parent != folder:
        raise ValueError(f"{name!r} would leave the calibration folder")
    return path


def checksum(tensors: dict, metadata: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != CHECKSUM_KEY:
            digest.update(f"{key}={metadata[key]}".encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(calibration: Calibration, folder, name: str) -> Path:
    from safetensors.torch import save_file

    calibration.validate()
    path = path_for(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=path.parent)
    try:
        os.close(fd)
        tensors, metadata = calibration.tensors(), calibration.metadata()
        metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path) -> Calibration:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CalibrationFileError(f"calibration {path.name} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise CalibrationFileError(f"calibration {path.name} is damaged or not a safetensors file: {e}") from None
    if not metadata or metadata.get(CHECKSUM_KEY) != checksum(tensors, metadata):
        raise CalibrationFileError(f"calibration {path.name} was refused: its checksum does not match "
                                   "(the file was damaged or edited)")
    try:
        return Calibration.from_tensors(tensors, metadata)
    except ValueError as e:
        raise CalibrationFileError(f"calibration {path.name} was refused: {e}") from None


def list_names(folder) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))


def find(folder, key: str) -> Calibration | None:
    """A stored, valid calibration with this key (see Calibration.key; files are named
    `<label>-<key>.safetensors`), if any; damaged files are skipped."""
    for name in list_names(folder):
        if name.endswith(f"{key}{SUFFIX}"):
            try:
                calibration = load(Path(folder) / name)
            except CalibrationFileError:
                continue
            if calibration.key() == key:
                return calibration
    return None
