"""Does a calibration fitted on one prompt (class) carry over to others?

For each trained digits model, guided: OLSS fitted on a teacher whose calibration noises all carry
class 3, against OLSS fitted on noises spread over all ten classes; both sampled on held-out seeds of
all ten classes. Prints the held-out RMSE of each and their ratio (the target: at most 1.5).

    make bench-generalization
"""
import argparse

import common
import comfy.samplers
import torch
from calibrated_samplers.nodes.methods import METHODS


def fitted(case, labels, nfe, teacher_steps):
    """{NFE: (sampler function, options, sigmas)} of OLSS as the Calibrate node fits it (re-solve and candidate
    choice included), on one teacher run with these calibration labels."""
    runs = {}
    for n in nfe:
        run = common.calibration_run(case, len(labels), n, teacher_steps, labels, "olss")
        if runs:                                     # one teacher for every NFE
            first = next(iter(runs.values()))
            run._trajectory, run.memo = first._trajectory, first.memo
        runs[n] = run
    out = {}
    for n, run in runs.items():
        with torch.inference_mode():                 # as ComfyUI runs its nodes
            tensors, _ = METHODS["olss"].fit(run)
        function, options = METHODS["olss"].sampler(tensors, run.plan.settings, case.schedule)
        out[n] = function, options, tensors["sigmas"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits_eps", "digits_flow"])
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 8])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=500)
    args = parser.parse_args()
    print("| model | NFE | OLSS fitted on class 3 | OLSS fitted on all classes | ratio |\n|---|---|---|---|---|")
    for name in args.models:
        case = common.Case.make(name, 3.0, 20)
        teacher = case.teacher(args.teacher_steps)
        one = fitted(case, torch.full((args.batch,), 3), args.nfe, args.teacher_steps)
        every = fitted(case, torch.arange(args.batch) % 10, args.nfe, args.teacher_steps)
        for n in args.nfe:
            errors = []
            for function, options, sigmas in (one[n], every[n]):
                sampler = comfy.samplers.KSAMPLER(function, extra_options=options)
                errors.append(common.rmse(case.sample(sampler, sigmas.float()), teacher))
            print(f"| {name} | {n} | {errors[0]:.4f} | {errors[1]:.4f} | {errors[0] / errors[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
