"""The evaluation layer: gaze fixation density maps, saliency metrics, perturbation
metrics, sanity checks and dataset-scale evaluation on dask.

It builds on the engine (the Explainer, the method families and fusion) and never
imports the widgets.
"""

from . import metrics  # noqa: E402, F401  (first: the registry)
from .faithfulness import faithfulness_correlation, infidelity, irof, road  # noqa: E402
from .robustness import avg_sensitivity, max_sensitivity, random_logit  # noqa: E402
from .sanity import model_randomization  # noqa: E402

__all__ = ["avg_sensitivity", "faithfulness_correlation", "infidelity", "irof",
           "max_sensitivity", "model_randomization", "random_logit", "road"]
