"""The growth fit behind long_context.py's projected hf points: a polynomial in the context length fitted by least
squares to the measured points (`fit_growth`), evaluated beyond them (`project`, `project_growing`), and an hf
record projected at a length it did not reach (`projected_hf`; the degree of each figure in `GROWTH`).
"""

from __future__ import annotations

GROWTH = {"prefill_s": 2, "point_s": 2, "decode_s_per_token": 1, "peak_extra_bytes": 1}  # polynomial degree in L


def fit_growth(points: list[tuple[float, float]], degree: int) -> dict[int, float]:
    """{power: coefficient} of y = sum_p c_p L^p fitted to (L, y) points by least squares.

    With at least degree + 1 points every power 0..degree is fitted; with fewer, only the highest powers (as many
    as there are points): one point at degree 2 gives y = c L^2, two give b L + c L^2. Lengths are scaled to the
    largest before solving (L^2 spans many orders of magnitude), so a polynomial of the fitted degree is
    recovered to rounding error.
    """
    import numpy as np

    if not points:
        raise ValueError("fit_growth needs at least one (length, value) point")
    powers = list(range(degree + 1))[-len(points):]
    scale = max(float(x) for x, _ in points)
    xs = np.array([float(x) / scale for x, _ in points])
    ys = np.array([float(y) for _, y in points])
    design = np.stack([xs ** p for p in powers], axis=1)
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    return {p: float(c) / scale ** p for p, c in zip(powers, coef)}


def project(fit: dict[int, float], length: float) -> float:
    return sum(c * float(length) ** p for p, c in fit.items())


def project_growing(points: list[tuple[float, float]], degree: int, length: float) -> float:
    """The fitted value at `length` (beyond the measured lengths), but never below the last measured point grown by
    one degree less: a noisy fit can bend down, the cost of more tokens does not (a prefill, quadratic, grows at
    least in proportion to the length; a time per token or a memory, linear, does not shrink)."""
    last_n, last_y = max(points)
    return max(project(fit_growth(points, degree), length), last_y * (length / last_n) ** (degree - 1))


def projected_hf(measured: dict[int, dict], length: int, reason: str) -> dict:
    """An hf record at `length` projected from the measured ones (see `fit_growth`; time never below linear)."""
    rec = {"tokens": length, "projected": True, "reason": reason, "from_lengths": sorted(measured)}
    for key, degree in GROWTH.items():
        points = [(n, r[key]) for n, r in sorted(measured.items()) if r.get(key) is not None]
        if points:
            rec[key] = project_growing(points, degree, length)
            rec.setdefault("fits", {})[key] = {"degree": degree, "coefficients": fit_growth(points, degree)}
    return rec
