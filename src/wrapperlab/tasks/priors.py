"""Operand priors P_T(O) of the paper (§5, App. C.2).

The three named in the main text take their name from the probability they give O_FT = b:
low (0.999, 0.001, 0), medium (0.9, 0.1, 0), high (0.5, 0.3, 0.2). The appendix's other two are named
``medium-low`` (0.99, 0.01, 0) and ``medium-high`` (0.7, 0.2, 0.1). A prior can also be written as three numbers
"0.7,0.2,0.1" (for a, b, c).
"""

from __future__ import annotations

import math

PRIORS: dict[str, tuple[float, float, float]] = {
    "low": (0.999, 0.001, 0.0),
    "medium-low": (0.99, 0.01, 0.0),
    "medium": (0.9, 0.1, 0.0),
    "medium-high": (0.7, 0.2, 0.1),
    "high": (0.5, 0.3, 0.2),
}


def resolve_prior(prior: str | tuple[float, ...] | list[float], n_operands: int = 3) -> tuple[float, ...]:
    """Name or numbers -> probabilities over the operands (validated: non-negative, summing to 1)."""
    if isinstance(prior, str):
        if prior in PRIORS:
            probs = PRIORS[prior]
        else:
            try:
                probs = tuple(float(x) for x in prior.split(","))
            except ValueError:
                raise ValueError(
                    f"prior {prior!r} is neither a name ({', '.join(PRIORS)}) nor comma-separated numbers"
                ) from None
    else:
        probs = tuple(float(x) for x in prior)
    if len(probs) != n_operands:
        raise ValueError(f"prior needs {n_operands} probabilities (one per operand), got {len(probs)}")
    if not all(math.isfinite(p) and p >= 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"prior probabilities must be >= 0 and sum to 1, got {probs}")
    return probs


def prior_name(probs: tuple[float, ...]) -> str:
    for name, p in PRIORS.items():
        if all(abs(a - b) < 1e-9 for a, b in zip(p, probs)):
            return name
    return ",".join(f"{p:g}" for p in probs)
