"""The analysis as text: the terminal table (``bstune analyze``), a recommendation (``bstune recommend``), and
the report's sections about the analysis (Markdown and HTML tables).

Two number styles: the terminal's (``format_number``, the one the analysis's own warnings and notes use;
intervals as ``[lo, hi]``) and the report's table cells (``cell``; intervals as ``lo to hi``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bstune.analysis import (
    LEVEL,
    NOISE_FORMS,
    Analysis,
    Interval,
    LawFit,
    Recommendation,
    format_number,
    plateau_words,
)

# (title, a sentence, (column heads, rows) or None): one section of the report
Table = tuple[list[str], list[list[str]]]
Section = tuple[str, str, Table | None]


# ------------------------------------------------------------------------------------------- the answer


def answer_lines(a: Analysis, trend: bool = True) -> list[str]:
    """Which batch size to use, one line each: best at the study's budget, fastest to the steps target, the
    critical batch size (with the regime of each measured batch size); then how lr* moves with B."""
    ans = a.answer
    if ans is None:
        return []
    better = "lowest" if a.direction == "minimize" else "highest"
    lines = []
    if ans.best is not None:
        c = ans.best
        near = (f"; within one run's seed noise ({format_number(c.noise)}) of it: B={', '.join(map(str, c.near))}"
                if c.near else "")
        lines.append(f"Best {a.metric} at the study's budget: B={c.batch_size} ({better} {a.metric} "
                     f"{format_number(c.value)}) with {_use(c)}{near}")
    else:
        lines.append(f"Best {a.metric} at the study's budget: none ({ans.why_not.get('best', '')})")
    if ans.fastest is not None and a.steps is not None:
        c = ans.fastest
        sign = "<=" if a.direction == "minimize" else ">="
        lines.append(f"Fastest to {a.metric} {sign} {a.steps.target:.4g}: B={c.batch_size} (~{_seconds(c.seconds)} "
                     f"at the {c.examples_per_second:,.0f} examples/s its trials ran at) with {_use(c)}")
    else:
        lines.append(f"Fastest to the target: not known ({ans.why_not.get('fastest', '')})")
    if ans.critical is not None:
        groups: dict[str, list[int]] = {}
        for b, r in ans.regimes.items():
            groups.setdefault(r, []).append(b)
        regimes = "; ".join(f"{r}: B={', '.join(map(str, bs))}" for r, bs in groups.items())
        lines.append(f"Critical batch size: ~{ans.critical:.0f} {bracketed_interval(ans.critical_interval, '.0f')} "
                     f"(from the {ans.critical_source}); {regimes}")
    else:
        lines.append(f"Critical batch size: not located ({ans.why_not.get('critical', '')})")
    if trend and a.peak is not None:
        lines.append(f"lr* peaks at B ~ {a.peak:.0f} {bracketed_interval(a.peak_interval, '.0f')} and falls "
                     "beyond it: above that batch size, a larger batch needs a smaller lr")
    elif trend and a.trend == "falls":
        lines.append("lr* falls with B across the measured batch sizes: a larger batch needs a smaller lr")
    return lines


def _use(c: Any) -> str:
    if c.plateau is None:
        return f"lr={format_number(c.lr)}, momentum={c.momentum:.3g}"
    plateau = f"; any {plateau_words(c.plateau)} is within one run's seed noise of the best"
    return f"lr={format_number(c.lr)}, momentum={c.momentum:.3g}{plateau}"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2g} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def answer_section(a: Analysis) -> list[Section]:
    """The report's opening section: the same answer as ``bstune recommend`` without -b."""
    lines = answer_lines(a)
    if not lines:
        return []
    return [("Which batch size to use", " ".join(f"{line}." for line in lines), None)]


# ------------------------------------------------------------------------------------------- terminal


def format_recommendation(rec: Recommendation) -> str:
    """A recommendation in a line, with its notes below."""
    lo, hi = rec.lr_interval
    what = "effective lr" if rec.basis == "effective" else "lr"
    source = "its own fitted optimum" if rec.form == "measured" else f"{rec.form} fit of the {what}"
    head = (f"B={rec.batch_size}: lr={format_number(rec.lr)} ({LEVEL:.0%} interval {format_number(lo)}-"
            f"{format_number(hi)}), momentum={rec.momentum:.3g}, effective lr={format_number(rec.effective_lr)}  "
            f"[{source}")
    flags = [name for name, on in (("extrapolated", rec.extrapolated),
                                   ("above critical", rec.above_critical)) if on]
    head += (", " + ", ".join(flags) if flags else "") + "]"
    return "\n".join([head] + [f"  - {n}" for n in rec.notes])


def format_analysis(a: Analysis) -> str:
    """A terminal table: which batch size to use, per-batch optima, the fits, B_noise, steps to target,
    warnings."""
    answer = answer_lines(a)
    lines = (["Which batch size to use:"] + [f"  {line}" for line in answer] + [""] if answer else [])
    lines += _optimum_lines(a)
    for title, fits, preferred in (("lr*(B)", a.fits, a.preferred),
                                   ("effective lr*(B) = lr/(1-m)", a.effective_fits, a.effective_preferred)):
        lines.append("")
        lines += _fit_lines(a, title, fits, preferred)
    lines.append("")
    lines.append(_critical_line(a))
    if a.b_noise is not None:
        what = "effective lr" if a.basis == "effective" else "lr"
        lines.append(f"B_noise of the saturating fit of the {what}* (where it stops growing with B) ~ "
                     f"{a.b_noise:.0f} {bracketed_interval(a.b_noise_interval, '.0f')}")
    else:
        lines.append("B_noise of the lr*(B) fit: not identified by the data (see the warnings)")
    lines += _steps_lines(a)
    if a.warnings:
        lines.append("")
        lines.append("Warnings:")
        lines.extend(f"  - {w}" for w in a.warnings)
    return "\n".join(lines)


def _optimum_lines(a: Analysis) -> list[str]:
    lines = [f"Optimum per batch size ({a.direction} {a.metric}; {LEVEL:.0%} intervals from "
             f"{a.n_boot} bootstrap resamples of the trials)"]
    head = (f"{'B':>6} {'done':>5} {'prun':>5} {'div':>4} {'best lr':>9} {'lr*':>9} {'lr* interval':>21} "
            f"{'m*':>6} {'eff lr*':>9} {'eff lr* interval':>21} {'value*':>9} {'max stable':>10} "
            f"{'B_simple':>8}  status")
    lines.append(head)
    n = format_number
    for o in a.per_batch:
        lines.append(
            f"{o.batch_size:>6} {o.n_complete:>5} {o.n_pruned:>5} {o.n_diverged:>4} {n(o.best_lr):>9} "
            f"{n(o.lr):>9} {bracketed_interval(o.lr_interval):>21} {n(o.momentum):>6} {n(o.effective_lr):>9} "
            f"{bracketed_interval(o.effective_lr_interval):>21} {n(o.value):>9} {n(o.max_stable_lr):>10} "
            f"{n(a.grad_noise_scale.get(o.batch_size)):>8}  {o.status}"
        )
    return lines


def _fit_lines(a: Analysis, title: str, fits: dict[str, LawFit], preferred: str | None) -> list[str]:
    if not fits:
        return [f"Fits of {title}: none (fewer than 2 batch sizes with an optimum)"]
    lines = [f"Fits of {title} (log2 space, weighted by the interval widths; {a.criterion}, lower is better)",
             f"  {'form':<15} {'parameters':<62} {'rms(oct)':>8} {a.criterion:>8} {'d' + a.criterion:>8} "
             f"{'weight':>6}"]
    for f in fits.values():
        mark = "  <- preferred" if f.form == preferred else ""
        if f.form == preferred and (fits is a.effective_fits) == (a.basis == "effective"):
            mark += ", used by recommend()"
        lines.append(f"  {f.form:<15} {_law_params(f):<62} {f.rms_log2:>8.3f} {format_number(f.aicc):>8} "
                     f"{f.delta:>8.1f} {f.weight:>6.2f}{mark}")
    return lines


def _steps_lines(a: Analysis) -> list[str]:
    s = a.steps
    if s is None:
        return []
    n = format_number
    lines = ["", f"Steps to target ({a.metric} {'<=' if a.direction == 'minimize' else '>='} "
             f"{s.target:.4g}, {s.target_rule}): S(B) = S_min (1 + B_crit/B)",
             f"  {'B':>6} {'steps':>10} {'examples':>12} {'fit':>10} {'reached':>8}"]
    for p in s.points:
        pred = s.predict(p.batch_size)
        bound = "<=" if p.upper_bound else ""  # reached by the first point: not fitted
        lines.append(f"  {p.batch_size:>6} {bound + n(p.steps):>10} {bound + n(p.examples):>12} "
                     f"{n(pred):>10} {p.n_reached:>4}/{p.n_curves:<3}")
    if s.b_crit is not None:
        lines.append(f"  S_min = {n(s.s_min)}  E_min = {n(s.e_min)}  B_crit = E_min/S_min = "
                     f"{s.b_crit:.0f} {bracketed_interval(s.b_crit_interval, '.0f')}  rms {s.rms_log2:.3f} octaves")
    else:
        lines.append("  no B_crit: the fit puts it outside the measured batch sizes (see warnings)")
    return lines


def bracketed_interval(iv: Interval | None, fmt: str = ".3g") -> str:
    """'[lo, hi]' ('-' for none); one unbounded on a side in words: '[above lo]', '[below hi]'."""
    if iv is None:
        return "-"
    words = open_interval(iv, fmt)
    return f"[{words}]" if words else "[" + ", ".join(format(v, fmt) for v in iv) + "]"


def open_interval(iv: Sequence[float], fmt: str = ".3g") -> str:
    """An interval unbounded on a side, in words ('above 0.8', 'below 40', 'unbounded'); '' for a bounded one.
    A lower end of 0 is unbounded too: the positive quantities' intervals (lr, B_noise) reach it only when
    their log does minus infinity."""
    lo, hi = iv
    low_open, high_open = not math.isfinite(lo) or lo == 0.0, not math.isfinite(hi)
    if low_open and high_open:
        return "unbounded"
    if high_open:
        return f"above {format(lo, fmt)}"
    if low_open:
        return f"below {format(hi, fmt)}"
    return ""


def _bound(f: LawFit) -> str:
    """A B_noise (or peak) fitted at the end of its search range, in words: a bound, not a value."""
    lo, hi = f.intervals["b_noise"]
    if "top" in f.note or "above" in f.note or "rises" in f.note:
        return f"above {lo:.0f}" if math.isfinite(lo) and lo > 0 else "not identified"
    return f"below {hi:.0f}" if math.isfinite(hi) else "not identified"


def _law_params(f: LawFit) -> str:
    p, iv = f.params, f.intervals
    if f.form in NOISE_FORMS:
        name = "peak B" if f.form == "surge" else "B_noise"
        if f.note:  # at the search's bound: not a value
            return f"lr_max={format_number(p['lr_max'])} {bracketed_interval(iv['lr_max'])}  {name} {_bound(f)}"
        return (f"lr_max={format_number(p['lr_max'])} {bracketed_interval(iv['lr_max'])}  "
                f"{name}={p['b_noise']:.0f} {bracketed_interval(iv['b_noise'], '.0f')}")
    text = f"a={format_number(p['a'])} {bracketed_interval(iv['a'])}"
    if f.form == "power":
        yes = {True: "yes", False: "no"}
        text += (f"  alpha={p['alpha']:.3f} {bracketed_interval(iv['alpha'], '.3f')}  "
                 f"1 in: {yes[bool(f.contains_linear)]}, 0.5 in: {yes[bool(f.contains_sqrt)]}")
    return text


# --------------------------------------------------------------------------------------- report cells


def cell(v: Any, fmt: str = ".3g") -> str:
    """A number in a report table ('-' for none or non-finite)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def interval_words(iv: Sequence[float] | None, fmt: str = ".3g") -> str:
    """'lo to hi' ('-' for none; 'above lo' or 'below hi' for one unbounded on a side)."""
    if iv is None:
        return "-"
    return open_interval(iv, fmt) or " to ".join(format(v, fmt) for v in iv)


def octaves(rule: float | None, lr: float) -> str:
    """How many octaves a rule's lr lies from the preferred one."""
    return "-" if rule is None else f"{math.log2(rule / lr):+.2f}"


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def law_verdict(fits: dict[str, LawFit], preferred: str | None, criterion: str) -> str:
    """The preferred form, and whether the linear and square-root rules are consistent with the power law."""
    if not fits or preferred is None:
        return "no fit: fewer than 2 batch sizes have a bracketed optimum"
    power = fits["power"]
    lo, hi = power.intervals["alpha"]
    parts = [f"The {preferred} form fits best. The power law's exponent is alpha = {power.alpha:.2f} "
             f"({LEVEL:.0%} interval {lo:.2f} to {hi:.2f})."]
    for name, form, alpha, inside in (("Linear", "linear", 1.0, power.contains_linear),
                                      ("Square-root", "sqrt", 0.5, power.contains_sqrt)):
        verdict = "inside the interval (consistent)" if inside else "outside the interval (ruled out)"
        parts.append(f"{name} rule (alpha = {alpha:g}): {verdict}, d{criterion} {fits[form].delta:.1f}.")
    return " ".join(parts)


def _law_params_cell(f: LawFit) -> str:
    p, iv = f.params, f.intervals
    if f.form in NOISE_FORMS:
        name = "peak at B" if f.form == "surge" else "B_noise"
        if f.note:
            return f"lr_max = {cell(p['lr_max'])} ({interval_words(iv['lr_max'])}), {name} {_bound(f)}"
        return (f"lr_max = {cell(p['lr_max'])} ({interval_words(iv['lr_max'])}), "
                f"{name} = {p['b_noise']:.0f} ({interval_words(iv['b_noise'], '.0f')})")
    text = f"a = {cell(p['a'])} ({interval_words(iv['a'])})"
    if f.form == "power":
        text += f", alpha = {p['alpha']:.3f} ({interval_words(iv['alpha'], '.3f')})"
    return text


# ----------------------------------------------------------------------------------- report sections


def law_sections(a: Analysis, law: dict[str, Any]) -> list[Section]:
    """The fitted forms of lr*(B) and of the effective lr*(B), each with its verdict."""
    out: list[Section] = []
    for key, fits, title in (("lr", a.fits, "lr*(B)"), ("effective_lr", a.effective_fits,
                                                         "effective lr*(B) = lr/(1 - m)")):
        used = (key == "effective_lr") == (a.basis == "effective")
        head = law[key]["verdict"] + (" These fits give the recommendations." if used and fits else "")
        body = None
        if fits:
            body = (["form", "parameters", "rms (octaves)", a.criterion, f"d{a.criterion}", "weight"],
                    [[f.form + (" (preferred)" if f.form == law[key]["preferred"] else ""), _law_params_cell(f),
                      f"{f.rms_log2:.3f}", cell(f.aicc), f"{f.delta:.1f}", f"{f.weight:.2f}"] for f in fits.values()])
        out.append((f"Fitted law: {title}", head, body))
    return out


def _critical_line(a: Analysis) -> str:
    """The one critical batch size (``Answer.critical``): the same number in every output."""
    ans = a.answer
    if ans is None or ans.critical is None:
        why = ans.why_not.get("critical", "") if ans is not None else ""
        return f"Critical batch size: not located ({why})" if why else "Critical batch size: not located"
    return (f"Critical batch size ~ {ans.critical:.0f} {bracketed_interval(ans.critical_interval, '.0f')} "
            f"(from the {ans.critical_source}: {CRITICAL_DEFINITION[ans.critical_source]})")


CRITICAL_DEFINITION = {
    "steps to target": "B_crit = E_min / S_min of S(B) = S_min (1 + B_crit / B), the batch size where "
                       "doubling B stops halving the steps",
    "B_noise of the lr*(B) fit": "where lr* stops growing with B, lr* = lr_max / (1 + B_noise / B)",
}


def critical_section(a: Analysis) -> list[Section]:
    if a.answer is None or a.answer.critical is None:
        return []
    return [("Critical batch size", _critical_line(a).removeprefix("Critical batch size ") + "; above it, larger "
             "batches buy few fewer steps.", None)]


def optimum_section(a: Analysis) -> Section:
    opt = [[str(o.batch_size), str(o.n_complete), str(o.n_pruned), str(o.n_diverged), cell(o.lr),
            interval_words(o.lr_interval), cell(o.momentum), cell(o.effective_lr), cell(o.value),
            "-" if o.plateau is None else plateau_words(o.plateau), cell(o.max_stable_lr), o.status]
           for o in a.per_batch]
    return ("Optimum per batch size", "The fitted optimum of each batch size's valley (not the best trial); "
            f"the plateau: the lrs (at m*) whose expected {a.metric} is within one run's seed noise of the optimum's.",
            (["B", "completed", "pruned", "diverged", "lr*", "lr* interval", "m*", "effective lr*",
              f"fitted {a.metric} at optimum", "plateau", "max stable lr", "status"], opt))


def steps_section(a: Analysis) -> list[Section]:
    s = a.steps
    if s is None:
        return []
    body = (["B", "steps", "examples", "fit", "trials reaching it"],
            [[str(p.batch_size), cell(p.steps, ".0f") + (" (upper bound)" if p.upper_bound else ""),
              cell(p.examples, ",.0f"), cell(s.predict(p.batch_size), ".0f"), f"{p.n_reached}/{p.n_curves}"]
             for p in s.points])
    crit = (f"S_min = {s.s_min:.0f}, E_min = {s.e_min:,.0f}, B_crit = {s.b_crit:.0f} "
            f"({interval_words(s.b_crit_interval, '.0f')})" if s.b_crit is not None and s.s_min is not None and s.e_min
            else "no B_crit (outside the measured batch sizes)")
    return [("Steps to target", f"Target {a.metric} {s.target:.4g} ({s.target_rule}); {crit}.", body)]
