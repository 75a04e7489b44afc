"""The joint refit experiment (benchmarks/joint_refit.py, used by the ceilings benchmark)."""
import sys

import comfy.samplers
import pytest
import torch

from host import ROOT
from test_olss import CALIBRATION, _noise, _olss_sampler, _run, calibrated  # noqa: F401 (fixture)
from calibrated_samplers.optimizers import olss
from calibrated_samplers.optimizers.teacher import rmse

sys.path.insert(0, str(ROOT / "benchmarks"))
import joint_refit  # noqa: E402


def test_joint_refit_never_raises_the_final_error_and_replays(calibrated):
    """JointRefit (all coefficients and interior sigmas for the final x, Levenberg-Marquardt): the fitted rows'
    error never rises, it counts its evaluations, measures the other rows, and the coefficients and sigmas it
    writes back replay its final x."""
    _, model, schedule, trajectory, gram, _ = calibrated
    start = olss.fit_olss(gram, olss.search_path(gram, 4))
    ours = start.copy()
    rows = list(range(0, CALIBRATION, 2))
    joint = joint_refit.JointRefit(trajectory.final, iterations=2, rows=rows)
    noise = _noise(CALIBRATION, 0)
    refine = comfy.samplers.KSAMPLER(joint_refit.refine_olss, extra_options={"coefficients": ours, "joint": joint})
    tuned = _run(model, refine, start.sigmas, noise)
    assert len(joint.errors) == len(joint.held_errors) == 3
    assert all(b <= a for a, b in zip(joint.errors, joint.errors[1:]))
    assert joint.errors[-1] < joint.errors[0]
    # per iteration: the Jacobian (sum over steps i < n - 1 of (i + 2)(n - 1 - i), plus n - i per sigma i) and
    # at least one trial run of n; plus the first run
    n = 4
    jacobian = sum((i + 2) * (n - 1 - i) for i in range(n - 1)) + sum(n - i for i in range(1, n))
    assert joint.evaluations >= n + 2 * (jacobian + n)
    assert torch.all(ours.sigmas[1:] < ours.sigmas[:-1])
    replay = _run(model, _olss_sampler(ours), ours.sigmas, noise)
    assert torch.allclose(replay, tuned, atol=1e-5)
    assert rmse(replay[rows], trajectory.final[rows]) == pytest.approx(joint.errors[-1], rel=1e-4)
