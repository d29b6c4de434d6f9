"""``python -m bench.affine_relevance_l1``: the R-LRP primitive ``R̃ = g_scale ⊙ a ⊙ Wᵀg`` with
each sample's ``‖R̃‖₁``, on each backend of the device, side by side, on real layers' shapes;
see :mod:`bench.primitives`."""
from __future__ import annotations

from .primitives import main


def call(backend, x):
    return backend.affine_relevance_l1(x.step, x.weight, x.g, x.a, x.scale)


if __name__ == "__main__":
    raise SystemExit(main("affine_relevance_l1", call, "g_scale ⊙ a ⊙ Wᵀg and its L1 per sample"))
