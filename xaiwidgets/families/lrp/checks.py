"""What an LRP result is checked for, and the warnings that say so: operations the
rules cannot see, BatchNorms left unmerged, relevance lost where the rules must
conserve it (and whether ε absorbed it).
"""

from __future__ import annotations

import warnings

from .engine import Explanation
from .rules import EPSILON_LOW
from .unseen import describe_unseen

#: relative conservation error above which a warning fires, where the rules must
#: conserve (see ``lrp.lrp``): float32 LRP-0 without biases conserves to ~1e-5 and the
#: stabilisers (1e-6, ε ≤ 1e-3) absorb well under 1 %; what the rules cannot see
#: (a functional residual add doubles relevance, a functional 2x2 mean divides it by 4)
#: is off by far more
CONSERVATION_TOLERANCE = 0.05


class LRPWarning(UserWarning):
    """An LRP map that is not what its rules promise (see :func:`~xaiwidgets.families.lrp.lrp`)."""


def warn_about(result: Explanation) -> None:
    if result.unseen:
        warnings.warn(
            "LRP's rules cannot see these operations of the model's forward, so relevance "
            "crosses them as a plain gradient and the map is not conservative: "
            f"{describe_unseen(result.unseen)}. Make them modules (a zennit.layer.Sum for "
            "sums, nn.AdaptiveAvgPool2d for pooling) or prefer a gradient method.",
            LRPWarning, stacklevel=4)
    if result.unmerged:
        warnings.warn(
            f"LRP: merging the BatchNorms {result.unmerged} into the layer before them "
            "changed the model's logits; they are kept as layers of their own (LRP-ε)",
            LRPWarning, stacklevel=4)
    worst = float(result.conservation_error.max())
    if result.offset_activations and worst > CONSERVATION_TOLERANCE:
        names = ", ".join(repr(n) for n in result.offset_activations[:3])
        more = len(result.offset_activations) - 3
        warnings.warn(
            f"LRP: relevance misses the target logit by {worst:.1%} because the model's "
            f"activation modules {names}{f' (and {more} more)' if more > 0 else ''} are not 0 "
            "where their input is 0 (sigmoid(0) = 0.5): like a bias, they add to the logit "
            "a part that no pixel caused, and LRP cannot hand it back to the image. "
            "Expected for such models: read the map as relative, or use a gradient method.",
            LRPWarning, stacklevel=4)
        return
    scale = (float(result.target_logit.abs().min()) if result.target_logit is not None
             else float("inf"))
    if result.conserving and worst > CONSERVATION_TOLERANCE and result.epsilon > 0.01 * scale:
        # ε of the top (dense) layer compared with its output z, the target logit
        trained = ("a model with trained weights (randomly initialised networks can have "
                   "vanishing activations)")
        fix = (f"a smaller epsilon (below {scale * 1e-3:.1g}, ≪ |z|) or {trained}"
               if scale * 1e-3 >= EPSILON_LOW else
               f"{trained}; epsilon cannot go below {EPSILON_LOW:g}, too large here")
        warnings.warn(
            f"LRP: relevance misses the target logit by {worst:.1%} because ε = "
            f"{result.epsilon:.3g} is large against this model's activations: the target "
            f"logit is only {scale:.3g} (|z| < 100 ε), so the stabiliser absorbs the "
            f"relevance, as LRP-ε does, and the map says little. Fix: {fix}",
            LRPWarning, stacklevel=4)
    elif result.conserving and worst > CONSERVATION_TOLERANCE:
        warnings.warn(
            f"LRP: relevance misses the target logit by {worst:.1%} although this model "
            "and composite conserve it (no bias, small ε): an operation outside the "
            "rules' view changes it", LRPWarning, stacklevel=4)
