"""The tests' LRP oracle: a slow one-shot computation with zennit's own hooks.

Not the engine: :class:`xaiwidgets.families.lrp.Canonized` keeps a forward pass and
computes each rule itself (faster terms, fused stabilisers). Here a composite's hooks
are registered on a fresh shadow copy with zennit's ``Composite.register``, the copy
runs forward and one backward pass starts from the target logit, the textbook way;
the hooks go in a ``finally`` (also when registering fails half-way).

>>> from xaiwidgets.families.lrp import make_composite
>>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
>>> relevance(net, torch.ones(1, 2), torch.tensor([0]), make_composite("zero")).shape
torch.Size([1, 2])
"""

from __future__ import annotations

import torch
from torch import nn
from zennit.core import Composite

from xaiwidgets.core.scoped import Scope
from xaiwidgets.families.lrp import shadow_copy


def relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
              composite: Composite) -> torch.Tensor:
    """LRP relevance of ``x`` (same shape) for one target class per row, with a given
    zennit composite, on a shadow copy of ``model`` (the model is never touched).

    The backward pass starts from the target logit (0 at the other classes), so with
    LRP-0 and no biases the relevance of each image sums to its target logit.
    """
    shadow = shadow_copy(model)
    x = x.detach().requires_grad_(True)
    with Scope() as scope, torch.enable_grad():
        scope.undo(composite.remove)  # recorded first: registration can fail half-way
        composite.register(shadow)
        logits = shadow(x)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError("the model must return logits of shape (N, classes)")
        seed = torch.zeros_like(logits)
        seed.scatter_(1, target[:, None], logits.detach().gather(1, target[:, None]))
        (rel,) = torch.autograd.grad(logits, x, grad_outputs=seed)
    return rel.detach()
