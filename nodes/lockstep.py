"""Several k-diffusion sampler functions run side by side on the same start, their model calls batched.

The built-in screen runs ten samplers on one noise per schedule: one at a time, that is forty model calls of one
latent each at 4 steps, and on a GPU a call of one latent costs much of what a call of eight does (the GPU is far
from full; not measured here). Run in lockstep they make four rounds of at most two calls: each sampler runs in its
own thread against a stand-in model that hands its call to the driver and waits; once every sampler still running
has asked for a call, the driver makes the round's calls together (each row keeps its own sigma and conditioning:
ComfyUI repeats a conditioning batch to the call's rows in order, so rows stacked sampler after sampler meet theirs)
and hands each its part. A sampler's result is what it would be alone, to the rounding of a batched call. No call
is larger than `max_rows` (the calibration batch: the teacher's calls are that large, so what fits the GPU for
them fits for these). Calibration runs are never masked: ComfyUI's inpainting mask, noise and picture are per row
of a run, and a batched call would not meet them.
"""
import threading

import torch


class _Stopped(Exception):
    """Raised in a sampler's thread when the run is given up (another sampler failed, or Cancel)."""


def run_side_by_side(model, samplers, x, sigmas, extra_args, max_rows, check=None) -> list:
    """[final x of each (function, options) in `samplers`], each run as a k-diffusion sampler on `model` from x
    over `sigmas` (its own copies of both) with `extra_args`, no callback, their model calls batched round by round
    in calls of at most `max_rows` rows (a sampler's own call larger than that is made alone). `check()`, called
    before each round's calls, may raise (Cancel): every sampler is then stopped and it propagates, as does a
    sampler's own error."""
    n = len(samplers)
    state = threading.Condition()
    asked, answers, finals, errors, done = {}, {}, [None] * n, [], set()
    stopped = [False]
    modes = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    class Proxy:
        def __init__(self, index):
            self.index = index

        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, x, sigma, **kwargs):
            with state:
                asked[self.index] = (x, sigma, kwargs)
                state.notify_all()
                while self.index not in answers and not stopped[0]:
                    state.wait()
                if stopped[0]:
                    raise _Stopped()
                return answers.pop(self.index)

    def work(index):
        function, options = samplers[index]
        try:
            with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
                finals[index] = function(Proxy(index), x.clone(), sigmas.clone(), extra_args=extra_args,
                                         callback=None, disable=True, **options)
        except _Stopped:
            pass
        except Exception as e:          # (re-raised by the driver)
            errors.append(e)
        finally:
            with state:
                done.add(index)
                state.notify_all()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    try:
        while True:
            with state:
                while not errors and len(asked) + len(done) < n:
                    state.wait()
                if errors:
                    raise errors[0]
                if not asked:
                    break
                order = sorted(asked)
                calls = [asked.pop(i) for i in order]
            if check is not None:
                check()
            outputs = _call(model, calls, max_rows)
            with state:
                answers.update(zip(order, outputs))
                state.notify_all()
    finally:
        with state:
            stopped[0] = True
            state.notify_all()
        for thread in threads:
            thread.join()
    return finals


def _call(model, calls, max_rows) -> list:
    """The model's outputs for each (x, sigma, kwargs) asked: batched, in calls of at most `max_rows` rows, where they
    pass the same options (the extra_args they were given), a request asked twice (the same x and sigma: every
    sampler's first, and the second of those whose first step is the same arithmetic) made once; else one call
    each."""
    kwargs = calls[0][2]
    if any(c[2].keys() != kwargs.keys() or any(c[2][k] is not kwargs[k] for k in kwargs) for c in calls):
        return [model(x, sigma, **k) for x, sigma, k in calls]
    unique, index = [], []
    for x, sigma, _ in calls:
        sigma = sigma.reshape(-1).expand(len(x)) if sigma.numel() == 1 else sigma.reshape(-1)
        found = next((i for i, (ux, us) in enumerate(unique) if torch.equal(ux, x) and torch.equal(us, sigma)), None)
        if found is None:
            found = len(unique)
            unique.append((x, sigma))
        index.append(found)
    chunks = [[]]
    for request in unique:
        if chunks[-1] and sum(len(x) for x, _ in chunks[-1]) + len(request[0]) > max_rows:
            chunks.append([])
        chunks[-1].append(request)
    outputs = []
    for chunk in chunks:
        out = model(torch.cat([x for x, _ in chunk]), torch.cat([s for _, s in chunk]), **kwargs)
        outputs += out.split([len(x) for x, _ in chunk])
    answers, given = [], set()
    for i in index:             # (a request asked twice gets a copy: samplers may write into what they are given)
        answers.append(outputs[i].clone() if i in given else outputs[i])
        given.add(i)
    return answers
