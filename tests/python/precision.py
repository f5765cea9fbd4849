"""How close a model's answer over the wire must be to TorchScript's own in FP32, given the
precision Kiln serves it in (the test passes what `precision = "auto"` chose on this machine as
SERVED_PRECISION): FP32 within float rounding; a reduced precision as the search held it, each
row's cosine at least 0.999 and no value off by more than a tenth of the largest."""

import os

import numpy as np


def close_to_fp32(got, want) -> bool:
    precision = os.environ.get("SERVED_PRECISION", "fp32")
    if got is None or got.shape != want.shape:
        return False
    # Channels-last changes the order of a sum's terms, not the precision.
    if precision.split()[0] == "fp32":
        return bool(np.allclose(got, want, rtol=1e-4, atol=1e-5))
    g = got.reshape(got.shape[0], -1).astype(np.float64)
    w = want.reshape(want.shape[0], -1).astype(np.float64)
    if not np.isfinite(g).all():
        return False
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1)
    # Two all-zero rows agree (as the server's search counts them); one alone does not.
    both_zero = (np.abs(g).max(axis=1) == 0) & (np.abs(w).max(axis=1) == 0)
    cosine = np.where(both_zero, 1.0, (g * w).sum(axis=1) / np.where(norms > 0, norms, 1.0))
    return bool((cosine >= 0.999).all() and np.abs(g - w).max() <= 0.1 * np.abs(w).max())
