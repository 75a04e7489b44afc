"""Where ComfyUI keeps calibrations: the `calibrations` model folder (models/calibrations, plus any
extra_model_paths entry), read through `folder_paths`; the store itself is `calibration_cache`."""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import folder_paths

from .. import calibration_cache as store

FOLDER = "calibrations"


def register_folder():
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {store.SUFFIX})


def write_folder() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


def find(key):
    """The stored calibration with this key in any calibrations folder, or None (one that fails `checked` is
    skipped: calibrating again replaces it)."""
    for path in folder_paths.get_folder_paths(FOLDER):
        found = store.find(path, key)
        if found is not None:
            try:
                return checked(found, key)
            except ValueError:
                continue
    return None


def find_nearby(plan, cfg, latent_shape, label):
    """(calibration, what is borrowed in words) of the nearest stored calibration for this model, steps and
    settings that was made for another cfg or latent size and whose range for `label` (`borrow_range`) covers
    them; None if there is none."""
    prefix = f"{plan.schedule.family}-{plan.request.steps}steps-"
    settings = json.dumps(plan.settings, sort_keys=True)
    found = []
    for folder in folder_paths.get_folder_paths(FOLDER):
        for name in store.list_names(folder):
            if not name.startswith(prefix):
                continue
            try:
                calibration = checked(store.load(Path(folder) / name), name)
                if calibration.fingerprint != plan.fingerprint or json.dumps(calibration.settings,
                                                                             sort_keys=True) != settings:
                    continue
                borrowed = calibration.check_compatible(cfg=cfg, latent_shape=latent_shape,
                                                        borrow=calibration.borrow_range(label))
            except ValueError:          # (a damaged file, or a CalibrationMismatch: outside its range)
                continue
            distance = abs(calibration.cfg - cfg) + sum(abs(math.log(g / f)) for g, f in
                                                          zip(latent_shape[1:], calibration.latent_shape[1:]))
            found.append((distance, name, calibration, borrowed))
    return min(found, key=lambda item: item[:2])[2:] if found else None


def checked(calibration, name):
    """The calibration, if every method it holds is known and its tensors are the method's, shaped for its steps;
    else ValueError naming the file and what is wrong."""
    from .methods import METHODS
    for method, tensors in calibration.fits.items():
        if method not in METHODS:
            raise ValueError(f"calibration {name} was refused: it holds an unknown method {method!r}")
        try:
            METHODS[method].check_tensors(tensors, calibration.steps)
        except ValueError as e:
            raise ValueError(f"calibration {name} was refused: {e}") from None
    return calibration


def file_name(label, key):
    return f"{label}-{key}"


def save(calibration, label):
    return store.save(calibration, write_folder(), file_name(label, calibration.key()))


def size_bound(steps, methods) -> int:
    """An upper bound of a calibration file's size in bytes: float64 tensors of at most (steps + 1)^2 values per
    method (OLSS's coefficients), plus the JSON metadata (per-step diagnostics)."""
    return len(methods) * (4 * 8 * (steps + 1) ** 2 + 4096 * (steps + 1)) + (1 << 20)


def check_writable(label, key, size):
    """Before any model call: raise ValueError naming the place and the fix unless the calibration file
    `label`-`key` can be written to the calibrations folder (a folder, writable, the file's place free of a
    folder or a link, `size` bytes free)."""
    folder = Path(write_folder())
    fix = "or give the calibrations another folder in ComfyUI's extra_model_paths.yaml"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the calibrations folder {folder} is a file, not a folder: move it away, {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"the calibrations folder {folder} cannot be written ({e.strerror or e}): make it "
                         f"writable for the user running ComfyUI, {fix}") from None
    path = folder / store.safe_name(file_name(label, key))
    if path.is_symlink() or (path.exists() and not path.is_file()):
        kind = "a link" if path.is_symlink() else "a folder"
        raise ValueError(f"{path} is {kind}, where this calibration's file goes: remove it, {fix}")
    free = shutil.disk_usage(folder).free
    if free < size:
        raise ValueError(f"the calibrations folder {folder} has {free / 2**20:.1f} MiB free, a calibration needs up to "
                         f"{size / 2**20:.1f} MiB: free some space, {fix}")


def names():
    return folder_paths.get_filename_list(FOLDER)


def file_identity(name):
    """(size, modification time, inode) of a stored calibration's file, or ("missing", name)."""
    path = folder_paths.get_full_path(FOLDER, name) if isinstance(name, str) else None
    try:
        stat = os.stat(path)
    except (OSError, TypeError):
        return ("missing", str(name))
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def load(name):
    if not isinstance(name, str):
        raise ValueError(f"calibration_name must be a file name, not {type(name).__name__}")
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise ValueError(f"calibration {name!r} not found in models/{FOLDER}")
    return checked(store.load(path), name)
