"""Where the best learning rate sits at each batch size, and how it moves with the batch size.

``analyze(table)`` reads a TrialTable and returns an :class:`Analysis`:

1. Per batch size, the optimum of a smooth fit to the objective's valley, not the best trial (whose lr jitters
   by an octave in a flat valley). The valley has much the same shape at every batch size and moves with it,
   so the batch sizes are fitted together (``pooled``), over the completed trials near each batch size's
   best: a lopsided parabola (in (lr/lr*)^(1/2): a long slope towards small lr, a steep wall towards large lr,
   as a training run's valley has) across a floor that is a line in (log2 lr, log2(1 - m)), tilted along the
   effective lr lr/(1 - m) (SGD with many steps), along the plain lr (Adam), or in between, the tilt moving
   with log2 B; per batch size an offset, a shift of the floor and a curvature, the last two pulled towards
   the others' only where it has fewer than 4 distinct trials in its valley: a batch size with 2-3 completed
   trials is placed by the others' shape, one with more by its own trials. m* is the valley's weighted median
   momentum, lr* the floor there, clipped to the valley's sampled range; the plateau the lrs (at m*) whose
   expected objective is within one run's noise of the optimum's. A batch size with a fixed momentum and a
   well-sampled valley is then fitted on its own, without the pooled shape (``smooth``: a real valley
   changes shape with B). Where no joint fit is possible, each batch size with ``min_trials`` completed
   trials is fitted alone (``valley``), by a 2-D quadratic in (log2 lr, log2(1 - m)) or a 1-D one. 95%
   intervals come from a bootstrap over the trials (within each batch size), vectorised over resamples;
   every resample is fitted by the estimator that fits the data (its window, priors and pooling from its own draws), and
   benchmarks/COVERAGE.md measures how often the intervals hold a known truth. Pruned trials'
   values come from earlier epochs and are not fitted; pruned and diverged trials count as the valley's walls
   when checking that the optimum is bracketed (an unbracketed one is only a bound and is left out of step 2).
2. Fits of lr*(B) and of the effective lr*(B) to six forms in log2 space (``laws``), weighted by the
   per-batch interval widths, compared by AICc: "power" a B^alpha, "linear" (alpha = 1), "sqrt"
   (alpha = 1/2), "saturating" lr_max / (1 + B_noise / B), "saturating-sqrt" its square root and "surge"
   (Adam's optimum, which rises, peaks at B_noise and falls). Their intervals refit every bootstrap replicate
   of the optima (trials resampled within each batch size), so they carry each optimum's uncertainty.
   B_noise, the critical batch-size estimate, comes from the saturating fit of whichever quantity the forms
   describe better (``Analysis.basis``): the effective lr for SGD with momentum, the plain lr for Adam; where
   the surge form is preferred, its peak is reported instead (``Analysis.peak``).
3. Steps to a target value from the learning curves (``steps``): S(B) = S_min (1 + B_crit / B),
   B_crit = E_min / S_min.
4. Which batch size to use (``answer``): the best objective at the study's budget, the fastest to the
   steps target on the trials' hardware, the critical batch size and each batch size's regime.

``driver.analyze`` runs the three steps; ``results`` holds what they return. Logarithms are base 2
throughout, so residuals and widths read in octaves. numpy and scipy only: the analysis reads trials, it
never runs them. Its text form is ``bstune.report.format_analysis``.
"""

from bstune.analysis.driver import analyze
from bstune.analysis.results import (
    FORMS,
    LEVEL,
    NOISE_FORMS,
    Analysis,
    BatchOptimum,
    Interval,
    LawFit,
    Recommendation,
    StepsFit,
    StepsPoint,
    format_number,
    jsonable,
    plateau_words,
)

__all__ = [
    "FORMS",
    "LEVEL",
    "NOISE_FORMS",
    "Analysis",
    "BatchOptimum",
    "Interval",
    "LawFit",
    "Recommendation",
    "StepsFit",
    "StepsPoint",
    "analyze",
    "format_number",
    "jsonable",
    "plateau_words",
]
