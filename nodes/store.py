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
    return checked(store.load(path), name)
