"""
Intervals for the evaluation's accuracies. Every accuracy the evaluation reports carries its 95 % Wilson score
interval and its trial count: with 20-100 trials a cell, "100 %" alone hides an interval reaching down to
83 % (20 trials) or 96 % (100 trials).
"""
import math

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson(k, n, z=Z95):
    """The Wilson score interval [lo, hi] of k successes in n trials (None for n = 0). Unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def cell(outcomes):
    """{"acc", "n", "ci"} of a list of booleans (None entries are left out: the method did not run there)."""
    xs = [bool(x) for x in outcomes if x is not None]
    if not xs:
        return {"acc": None, "n": 0, "ci": None}
    k = sum(xs)
    return {"acc": round(k / len(xs), 4), "n": len(xs), "ci": wilson(k, len(xs))}


def fmt(acc, ci=None, n=None):
    """'95.0% (88-98, n=60)' for the console and the report; '-' when there is no accuracy."""
    if acc is None:
        return "-"
    s = f"{100 * acc:.1f}%"
    if ci is not None:
        s += f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f}" + (f", n={n})" if n is not None else ")")
    return s
