"""The Calibration record and its on-disk store: data only, atomic, validated, never unpickled."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from calibrated_samplers.calibration_cache import (CalibrationFileError, find, list_names, load, path_for,
                                                   safe_name, save)
from calibrated_samplers.optimizers.calibration import Calibration, CalibrationMismatch


SIGMAS = torch.tensor([14.6, 2.0, 0.5, 0.0])


def _record(**overrides):
    fields = dict(family="eps", fingerprint="abc123", cfg=3.0, latent_shape=(4, 8, 8), steps=3,
                  settings={"teacher": {"steps": 500, "solver": "dpmpp_2m"}, "seed": 0, "batch": 8},
                  fits={"olss": {"sigmas": SIGMAS, "weights_x": torch.rand(3), "weights_d": torch.rand(3, 3)}},
                  evaluations={"olss": 3}, diagnostics={"olss": {"step_error": [0.1, 0.2, 0.3]}})
    fields.update(overrides)
    return Calibration(**fields)


def test_round_trip(tmp_path):
    record = _record()
    path = save(record, tmp_path, "my calibration")
    loaded = load(path)
    assert loaded.key() == record.key() and loaded.methods == ["olss"] and loaded.steps == 3
    torch.testing.assert_close(loaded.fits["olss"]["weights_d"], record.fits["olss"]["weights_d"])
    assert loaded.diagnostics == record.diagnostics and loaded.latent_shape == (4, 8, 8)
    assert list_names(tmp_path) == ["my_calibration.safetensors"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_find_by_key(tmp_path):
    record = _record()
    save(record, tmp_path, f"eps-3steps-{record.key()}")
    assert find(tmp_path, record.key()).key() == record.key()
    assert find(tmp_path, _record(cfg=5.0).key()) is None


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "edit_json", "garbage", "empty"])
def test_damaged_files_are_refused(tmp_path, damage):
    path = save(_record(), tmp_path, "x")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "bitflip":
        data[-5] ^= 0x10
    elif damage == "edit_json":
        assert b'cfg\\": 3.0' in data
        data = data.replace(b'cfg\\": 3.0', b'cfg\\": 7.0')
    elif damage == "garbage":
        data = b"\x80\x04\x95 not a safetensors file" * 10
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(CalibrationFileError, match="x.safetensors"):
        load(path)
    assert find(tmp_path, "x") is None


def test_wrong_schema_version_is_refused(tmp_path):
    path = save(_record(schema_version=99), tmp_path, "future")
    with pytest.raises(CalibrationFileError, match="schema version 99"):
        load(path)


def test_non_finite_fits_are_never_written(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        save(_record(fits={"olss": {"sigmas": SIGMAS, "weights_x": torch.tensor([1.0, float("nan")])}}), tmp_path,
             "nan")
    assert list_names(tmp_path) == []


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", "a/b/c", "..", "~user", "con:x"])
def test_names_cannot_escape_the_folder(tmp_path, name):
    try:
        path = path_for(tmp_path, name)
    except ValueError:
        return
    assert path.parent == tmp_path.resolve() and not safe_name(name).startswith(".")


def test_mismatches_name_the_setting():
    record = _record()
    record.check_compatible(family="eps", fingerprint="abc123", latent_shape=(4, 8, 8), cfg=3.0, steps=3)
    for kwargs, word in [({"family": "flow"}, "family"), ({"fingerprint": "zzz"}, "model"),
                         ({"latent_shape": (4, 16, 16)}, "latent shape"), ({"cfg": 5.0}, "cfg"),
                         ({"steps": 8}, "steps")]:
        with pytest.raises(CalibrationMismatch, match=word):
            record.check_compatible(**kwargs)


def test_a_nearby_setting_is_borrowed_only_within_the_stored_range():
    record = _record()
    assert record.borrow_range("olss") is None
    record.diagnostics["borrowable"] = {"olss": {"cfg": [-1.0, 0.5], "sides": [1.0, 2.0]}}
    near = record.borrow_range("olss")
    assert record.check_compatible(cfg=3.0, latent_shape=(4, 8, 8), borrow=near) == []
    assert record.check_compatible(cfg=2.0, latent_shape=(4, 16, 8), borrow=near) == [
        "latent shape (4, 16, 8) (made for (4, 8, 8))", "cfg 2 (made for 3)"]
    for kwargs, message in [({"cfg": 3.6}, "from cfg 2 to 3.5"), ({"cfg": 1.9}, "from cfg 2 to 3.5"),
                            ({"latent_shape": (4, 4, 8)}, "sides 1 to 2 times"),
                            ({"latent_shape": (4, 8, 32)}, "sides 1 to 2 times"),
                            ({"latent_shape": (16, 8, 8)}, "latent shape")]:
        with pytest.raises(CalibrationMismatch, match=message):
            record.check_compatible(borrow=near, **kwargs)
    with pytest.raises(CalibrationMismatch, match="not 2.5: use that cfg"):     # no range: its own settings only
        record.check_compatible(cfg=2.5, borrow=record.borrow_range("iia_ddim"))


WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
import host; host.setup(comfy=False)
from calibrated_samplers.calibration_cache import save
from calibrated_samplers.optimizers.calibration import Calibration
big = {{"olss": {{"sigmas": torch.tensor([1.0, 0.0]), "weights_d": torch.full((2000, 2000), float(sys.argv[1]))}}}}
record = Calibration("eps", "f", 1.0, (4, 8, 8), 1, {{}}, fits=big, evaluations={{"olss": 1}})
print("ready", flush=True)
while True:
    save(record, sys.argv[2], "shared")
"""


def _writer(tmp_path, value):
    from host import TESTS
    return subprocess.Popen([sys.executable, "-c", WRITER.format(tests=str(TESTS)), str(value), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)


def test_killed_and_concurrent_writers_never_leave_a_torn_file(tmp_path):
    """Two processes write the same key in a loop; both are killed mid-write, repeatedly."""
    for round_ in range(3):
        writers = [_writer(tmp_path, 1.0), _writer(tmp_path, 2.0)]
        for w in writers:
            assert w.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.2 * round_)
        for w in writers:
            w.send_signal(signal.SIGKILL)
            w.wait()
        record = load(tmp_path / "shared.safetensors")       # raises if torn
        value = float(record.fits["olss"]["weights_d"][0, 0])
        assert value in (1.0, 2.0)
        assert torch.all(record.fits["olss"]["weights_d"] == value)
    assert list_names(tmp_path) == ["shared.safetensors"]


@pytest.mark.parametrize("sigmas", [[14.6, 2.0, 0.5, 0.001], [14.6, 2.0, 2.0, 0.0], [14.6, float("nan"), 0.5, 0.0]])
def test_every_method_schedule_must_end_in_zero_on_save_and_load(tmp_path, sigmas):
    """A method's own sigmas are checked like the record's (uni_pc once wrote 0.001 into a stored last sigma)."""
    bad = _record(fits={"timetuner": {"sigmas": torch.tensor(sigmas), "ratios": torch.ones(3, dtype=torch.float64)}},
                  evaluations={"timetuner": 3})
    with pytest.raises(ValueError, match="timetuner.sigmas"):
        save(bad, tmp_path, "bad")
    assert list(tmp_path.iterdir()) == []
    good = _record(fits={"timetuner": {"sigmas": SIGMAS, "ratios": torch.ones(3, dtype=torch.float64)}},
                   evaluations={"timetuner": 3})
    tensors, metadata = good.tensors(), good.metadata()
    tensors["timetuner.sigmas"] = torch.tensor(sigmas)
    with pytest.raises(ValueError, match="timetuner.sigmas"):
        Calibration.from_tensors(tensors, metadata)


def test_a_schema_1_record_is_refused_by_its_version(tmp_path):
    """Schema 1 kept a top-level `sigmas` and called the settings `teacher`: such a file is refused, not misread."""
    from calibrated_samplers.calibration_cache import CHECKSUM_KEY, checksum
    from safetensors.torch import save_file
    tensors = {"sigmas": SIGMAS, "olss.weights_x": torch.rand(3)}
    old = {"schema_version": 1, "family": "eps", "fingerprint": "f", "cfg": 3.0, "latent_shape": [4, 8, 8],
           "teacher": {}, "methods": {"olss": ["weights_x"]}}
    metadata = {"calibrated_samplers": json.dumps(old)}
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    with pytest.raises(CalibrationFileError, match="schema version 1.*calibrate again"):
        load(tmp_path / "old.safetensors")


@pytest.mark.parametrize("damage, message", [
    ({"evaluations": {}}, "no model evaluation count"),
    ({"steps": 5}, "olss.sigmas has 3 steps, the calibration 5"),
    ({"fits": {"olss": {"weights_x": torch.rand(3)}}}, "olss has no sigmas"),
])
def test_a_record_must_say_what_each_method_holds(tmp_path, damage, message):
    with pytest.raises(ValueError, match=message):
        save(_record(**damage), tmp_path, "x")


def test_the_shipped_nearby_ranges_are_the_measured_ones():
    """nodes/nearby.json is what benchmarks/transfer.py derives from its stored measurement, not a hand-set guess."""
    import json
    import sys
    from host import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import transfer
    from calibrated_samplers.nodes import nearby
    rows = json.loads((ROOT / "benchmarks" / "results" / "transfer.json").read_text())
    shipped = json.loads(nearby.FILE.read_text())
    assert shipped["methods"] == transfer.ranges(rows) and shipped["tolerance"] == transfer.TOLERANCE
    assert set(shipped["measured_on"]) == {row["model"] for row in rows}
