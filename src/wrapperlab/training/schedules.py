"""Learning-rate schedules: linear warmup, then cosine (or constant) down to ``min_lr_frac`` x the peak.

Paper App. C.2: pretraining warms up over the first 20 % then follows a cosine (the paper does not state the
floor; we decay to 0, which makes the average pretraining LR, the paper's η_PT of §5, 5e-4); fine-tuning warms up
over 20 % and decays by cosine to max/100. Tracr fine-tuning (App. C.1) uses 2K warmup steps, hence
``warmup_steps``.
"""

from __future__ import annotations

import math


def lr_at(step: int, total: int, peak: float, warmup: int, min_frac: float, kind: str = "cosine") -> float:
    """LR for optimisation step ``step`` (0-based) of ``total``."""
    if kind == "cosine-whole":  # the ramp multiplies a cosine that spans the whole run (no floor)
        return peak * min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / total))
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    floor = peak * min_frac
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
