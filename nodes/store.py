"""Where ComfyUI keeps calibrations: the `calibrations` model folder (models/calibrations, plus any
extra_model_paths entry), read through `folder_paths`; the store itself is `calibration_cache`."""
import os

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
    """The stored calibration with this key in any calibrations folder, or None."""
    for path in folder_paths.get_folder_paths(FOLDER):
        found = store.find(path, key)
        if found is not None:
            return found
    return None


def save(calibration, label):
    return store.save(calibration, write_folder(), f"{label}-{calibration.key()}")


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
    return store.load(path)
