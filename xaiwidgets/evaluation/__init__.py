"""The evaluation layer: gaze fixation density maps, saliency metrics, perturbation
metrics, sanity checks and dataset-scale evaluation on dask.

It builds on the engine (the Explainer, the method families and fusion) and never
imports the widgets.
"""

# the metric families register themselves in metrics.METRICS on import
from . import benchmark, complexity, localisation, metrics  # noqa: F401
from .faithfulness import faithfulness_correlation, infidelity, irof, road
from .robustness import avg_sensitivity, max_sensitivity, random_logit
from .sanity import model_randomization

__all__ = ["avg_sensitivity", "faithfulness_correlation", "infidelity", "irof",
           "max_sensitivity", "model_randomization", "random_logit", "road"]
