"""The calibrated methods: one module each, and the registry that the nodes, the report and KSampler
(Calibrated) loop over without naming a method.

A `Method` owns everything about itself: its settings and their checks, the schedule it samples on,
whether it needs the teacher, the settings it adds to a calibration's key, its fit, its sampler, its
model evaluations per sample, which KSampler inputs a calibration of it must match, its plain solver on the
same sigmas (what a fit that validates worse is stored as, `nodes/validation.py`), its stored tensors' shapes,
and what it reports (`fit`'s diagnostics: "evaluations" the fit made, "step_error", "plain_step_error"
where the method corrects a plain solver, "rmse" where its fitting run was its own sample on the batch, and
"cross_validated" where the fit judged itself on the `folds` that validation uses). Adding a method is one
module and one line in `METHODS` below.
"""
import torch

from ...optimizers.calibration import CalibrationMismatch


class NotApplicable(ValueError):
    """A method that cannot be fitted for this request's model or schedule (not a wrong input): when several
    methods are asked for (`all`, KSampler (Calibrated)'s `auto`), it is left out; asked for alone, refused."""


class Method:
    name = ""
    summary = ""                    # one line, for tooltips
    follows = ()                    # KSampler inputs a calibration of this method must match ("scheduler", ...)
    node = ("", "", "")             # (node id, display name, description) of its sampler node; methods that share
    default_variant = False         # a node are its variants, this one the default
    in_all = True                   # fitted by method `all`
    in_auto = True                  # and by KSampler (Calibrated)'s `auto` (where within its evaluations)

    def needs_teacher(self, request) -> bool:
        return True

    def check(self, request, sigmas, schedule):
        """Raise ValueError naming the input if this method cannot be fitted for the request (NotApplicable where
        the request is fine but the method does not apply to it)."""

    def settings(self, request) -> dict:
        """The request's settings this method's fit depends on (they enter the calibration's key)."""
        return {}

    def evaluations(self, steps, settings) -> int:
        """Model evaluations per sample when sampling `steps` steps."""
        return steps

    def fit(self, run) -> tuple[dict, dict]:
        """(tensors, with the "sigmas" it samples on; JSON-able diagnostics) fitted on a CalibrationRun."""
        raise NotImplementedError

    def sampler(self, tensors, settings, schedule, **inputs) -> tuple:
        """(k-diffusion sampler function, its options) from stored tensors and the calibration's settings, for a
        model with this NoiseSchedule; `inputs`: those of its sampler node (`sampler_inputs`)."""
        raise NotImplementedError

    def plain_sampler(self, settings):
        """The built-in sampler this method corrects on the schedule it keeps (with `follows` "scheduler": scheduler
        auto tries the schedules where that sampler did best), or None."""
        return None

    def check_use(self, settings, **given):
        """Raise CalibrationMismatch if a KSampler input this method follows (`follows`) differs from the setting
        the calibration was fitted with (a given scheduler "auto" takes the calibration's)."""
        for name in self.follows:
            fitted = settings.get(name)
            if fitted is not None and given.get(name) not in (None, "auto") and given[name] != fitted:
                raise CalibrationMismatch(f"this calibration was fitted with {name} {fitted}, not {given[name]}: "
                                          f"set {name} to {fitted} or calibrate again")

    def shapes(self, steps) -> dict:
        """{name: shape} that a stored fit of `steps` steps must have besides its sigmas (which the record checks)."""
        return {}

    def check_tensors(self, tensors, steps):
        """Raise ValueError naming the tensor unless a stored fit has exactly this method's tensors, shaped for
        `steps` steps (the record itself checks that they are finite and that the sigmas are a schedule)."""
        expected = {"sigmas": (steps + 1,), **self.shapes(steps)}
        if set(tensors) != set(expected):
            raise ValueError(f"{self.name} holds {sorted(tensors)}, expected {sorted(expected)}")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != tuple(shape):
                raise ValueError(f"{self.name}.{key} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)} "
                                 f"for {steps} steps")

    def plain_tensors(self, tensors, settings, schedule) -> dict:
        """The fit's plain solver on the same sigmas, as this method's tensors (identity coefficients or ratios):
        what a fit that validates worse is stored as."""
        raise NotImplementedError

    @staticmethod
    def inputs() -> list:
        """Inputs of the Calibrate node that only this method reads (optional, appended after the others)."""
        return []

    @staticmethod
    def sampler_inputs() -> list:
        """Inputs of its sampler node besides the calibration (and the variant)."""
        return []


def finite(name, tensors):
    """The fitted tensors, or ValueError if any is NaN or inf (nothing is stored then)."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name}: the fit gave NaN or inf ({key}); the model's outputs are not finite or the "
                             "calibration batch is degenerate: nothing was stored")
    return tensors


def folds(batch) -> list:
    """The two folds of a calibration batch that validation fits on and judges with (the even and the odd
    noises); none for a batch of one."""
    return [list(range(0, batch, 2)), list(range(1, batch, 2))] if batch >= 2 else []


def scheduler_setting(request) -> dict:
    """The scheduler, for a method that samples on (or tries) the scheduler's sigmas, unless sigmas were given."""
    return {} if request.sigmas is not None else {"scheduler": request.scheduler}


from . import iia, olss, time_steps, timetuner  # noqa: E402

METHODS = {m.name: m for m in [
    olss.OLSS("olss"),
    olss.OLSS("olss_p"),
    iia.IIA("iia_ddim"),
    iia.IIA("biia_heun"),
    iia.IIA("iia_heun"),
    timetuner.TimeTuner(),
    time_steps.TimeSteps(),
]}
ALL = [name for name, method in METHODS.items() if method.in_all]      # what method `all` fits
AUTO = [name for name in ALL if METHODS[name].in_auto]                  # what `auto` may fit
