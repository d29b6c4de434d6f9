"""``python -m bench.affine_relevance``: the classic rules' primitive ``a ⊙ Wᵀ(g / stab(z))``
(LRP-ε's division path: ``z`` the layer's pre-activation, ε 1e-6) on each backend of the
device, side by side, on real layers' shapes; see :mod:`bench.primitives`."""
from __future__ import annotations

from .primitives import main

EPS = 1e-6


def call(backend, x):
    return backend.affine_relevance(x.step, x.weight, x.g, x.a.shape, x.a, z=x.z, eps=EPS)


if __name__ == "__main__":
    raise SystemExit(main("affine_relevance", call, "a ⊙ Wᵀ(g / stab(z)), eps 1e-6"))
