"""rlrp_fast: fast Relative Layer-wise Relevance Propagation (R-LRP) for PyTorch classifiers.

    >>> import rlrp_fast
    >>> e = rlrp_fast.explain(model.eval(), images)          # R-LRP, arg-max class
    >>> e.relevance.shape == images.shape
"""
from .capture import SUPPORTED_OPS, UnsupportedModelError
from .explainer import Explainer, Explanation, explain
from .explained_model import ExplainedModel
from .guard import StaleModelError
from .verify import TraceMismatchError
from .rules import RULES, Composite

__version__ = "0.1.0"

__all__ = ["Explainer", "ExplainedModel", "Explanation", "explain", "Composite", "RULES", "SUPPORTED_OPS",
           "UnsupportedModelError", "StaleModelError", "TraceMismatchError", "__version__"]
