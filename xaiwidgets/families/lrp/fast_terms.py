"""The kept parts that make an LRP slider move cheap, on a kept forward pass.

What one call of a rule-bearing module left (:class:`Call`: inputs, output, its
sign), and each rule's relevance computed from it with less work than zennit's
``BasicHook.backward`` and the same numbers: LRP-ε and Norm from the kept output
(:func:`summands_times` for sums), z⁺, α/β and γ after a ReLU from two kept parts
(:func:`nonnegative_layer`), any other layer rule from its kept terms
(:func:`layer_rule`). Pinned to the rules' own terms by ``tests/test_lrp_cache.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from zennit.core import BasicHook, ParamMod
from zennit.rules import NoMod
from zennit.types import ConvolutionStandard

from .rules import AlphaBeta, GammaRule, ZPlusRule


class Call:
    """What one call of a rule-bearing module left for its rule: the inputs, the
    output (and its version, to notice in-place changes) and, for layers, the
    module's own autograd graph from its input to its output (LRP-ε reads it)."""

    __slots__ = ("args", "kwargs", "x", "z", "version", "own", "terms", "sign", "denominator",
                 "last_epsilon", "divisions", "_nonnegative")

    def __init__(self, args: tuple, kwargs: dict, x: torch.Tensor, output: torch.Tensor,
                 own: bool) -> None:
        self.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        self.kwargs = kwargs
        self.x = x if own else None
        self.z = output.detach()
        self.version = output._version
        self.own = output if own else None
        #: the layer evaluations of the last rule that keeps any (:func:`layer_rule`,
        #: :func:`nonnegative_layer`); ``None`` after its first backward (see
        #: :meth:`keep_terms`)
        self.terms: dict[tuple, Any] = {}
        #: what :meth:`divide` keeps from its second call on, one of the two: zennit's
        #: sign of ``z`` (0 → +1) while ε moves, or (ε, z + ε·sign z) while ε stays
        self.sign: torch.Tensor | None = None
        self.denominator: tuple[float, torch.Tensor] | None = None
        self.last_epsilon: float | None = None
        self.divisions = 0
        self._nonnegative: bool | None = None

    def keep_terms(self, key: tuple, terms: Any) -> None:
        """Offer a rule's layer evaluations that no parameter changes: kept from the
        second offer under the same ``key`` on (a slider moving on a kept forward; a
        one-shot call keeps nothing extra), one rule's at a time."""
        self.terms = {key: terms if key in self.terms else None}

    def nonnegative(self) -> bool:
        """Whether the module's input has no negative value (checked once)."""
        if self._nonnegative is None:
            self._nonnegative = not bool((self.args[0] < 0).any())
        return self._nonnegative

    def divide(self, grad: torch.Tensor, epsilon: float) -> torch.Tensor:
        """``grad / (z + ε·sign z)``, zennit's stabilised denominator (sign 0 → +1) bit
        for bit (see :func:`_stabilised`), as a new tensor.

        A one-shot call keeps nothing; from the second division on, one tensor is kept:
        the denominator while ε stays the same (a channel click, a target change:
        one division), else the sign (an ε slider: one fused ``addcmul`` and the
        division). The sign of a kept denominator is the sign of ``z``: adding ε·sign z
        moves no value across zero.

        >>> call = Call((torch.ones(3),), {}, torch.ones(3), torch.tensor([-2.0, 0.0, 3.0]),
        ...             own=False)
        >>> [call.divide(torch.ones(3), 1.0).tolist() for _ in range(3)][-1]
        [-0.3333333432674408, 1.0, 0.25]
        >>> call.denominator[1].tolist()
        [-3.0, 1.0, 4.0]
        """
        kept = self.denominator
        if kept is not None and kept[0] == epsilon:
            return torch.div(grad, kept[1])
        sign = self.sign
        if sign is None:
            sign = _zennit_sign(self.z if kept is None else kept[1])
        shifted = torch.addcmul(self.z, sign, sign.new_tensor(epsilon))
        self.divisions += 1
        steady, self.last_epsilon = self.last_epsilon == epsilon, epsilon
        if self.divisions > 1:  # on a kept forward
            if steady:  # keep the denominator, divide into a new tensor
                self.sign, self.denominator = None, (epsilon, shifted)
                return torch.div(grad, shifted)
            self.sign, self.denominator = sign, None
        return torch.div(grad, shifted, out=shifted)  # its own buffer: no new one


def is_convolution(module: nn.Module) -> bool:
    """Whether ``module`` is a standard (not transposed) convolution, zennit's
    ``ConvolutionStandard``, remembered per module type: zennit's type checks run
    Python code, several per layer and backward pass.

    >>> is_convolution(nn.Conv2d(1, 1, 1)), is_convolution(nn.ConvTranspose2d(1, 1, 1))
    (True, False)
    """
    return _standard_convolution_type(type(module))


@functools.cache
def _standard_convolution_type(kind: type) -> bool:
    return issubclass(kind, ConvolutionStandard)


def summands_times(call: Call, mapped: torch.Tensor, dim: int) -> torch.Tensor:
    """The Norm rule's relevance of a zennit ``Sum``: its stacked summands times
    ``mapped`` (a sum's gradient is ``mapped`` for every summand), laid out
    summand-major, so each summand's relevance is a contiguous slice for the stack's
    backward. The kept summands are re-laid summand-major once (same values; the
    stacked original is dropped), so later products read them contiguously too.

    >>> call = Call((torch.ones(2, 3, 2),), {}, torch.ones(2, 3, 2), torch.ones(2, 3), own=False)
    >>> summands_times(call, torch.arange(6.).reshape(2, 3), -1)[..., 1]
    tensor([[0., 1., 2.],
            [3., 4., 5.]])
    """
    moved = call.args[0].movedim(dim, 0)
    if not moved.is_contiguous():
        moved = moved.contiguous()
        call.args = (moved.movedim(0, dim), *call.args[1:])
        call.x = None  # only the graph input of the module's own backward, unused for sums
    out = torch.empty(moved.shape, dtype=mapped.dtype, device=mapped.device)
    torch.mul(moved, mapped, out=out)
    return out.movedim(0, dim)


def nonnegative_layer(rule: BasicHook, module: nn.Module, call: Call,
                       grad: torch.Tensor) -> torch.Tensor | None:
    """zennit's z⁺ (:class:`ZPlusRule`), our α/β (:class:`AlphaBeta`) and zennit's
    generalised γ (:class:`GammaRule`) on a layer whose input x is non-negative (after
    a ReLU); ``None`` where that does not apply (the caller then runs the rule's own
    terms).

    With x ≥ 0 every x⁻ term of these rules is zero and what is left are two parts
    that no rule parameter changes: P = layer(x; w⁺, b⁺) and N = layer(x; w⁻, b⁻),
    kept (stabilised for z⁺ and α/β) from the rule's second backward on a kept
    forward, like :func:`layer_rule`'s fixed terms. Then, with m = grad:

    * z⁺: R = x · w⁺ᵀ(m / s(P)); α/β: R = α·x·w⁺ᵀ(m / s(P)) − β·x·w⁻ᵀ(m / s(N)),
      with zennit's stabiliser s; the same operations as the rules' own terms;
    * γ, by linearity: the terms' outputs are z + γP (on z > 0) and z + γN (on
      z < 0), R = x · ((w + γw⁺)ᵀ(m / s(z + γP)) + (w + γw⁻)ᵀ(m / s(z + γN))): same
      numbers as zennit's rule up to float round-off (z + γP is summed in another
      order than layer(x; w + γw⁺)).

    A parameter change then runs no forward convolution: each term is one transposed
    layer. Tested against the rules' own terms.
    """
    x, z = call.args[0], call.z
    epsilon = rule.stabilizer
    if (not isinstance(epsilon, float) or epsilon < 0 or getattr(rule, "gamma", 0.0) < 0
            or z._version != call.version or call.kwargs
            or (is_convolution(module)
                and (module.padding_mode != "zeros" or isinstance(module.padding, str)))
            or not call.nonnegative()):
        return None
    gamma_rule = type(rule) is GammaRule
    key = (nonnegative_layer, gamma_rule, epsilon)
    kept = call.terms.get(key)
    if kept is None:
        positive, negative, weights = _signed_parts(module, x)
        if gamma_rule:  # z ± ε where z > 0 (z < 0), +∞ elsewhere: there m / (… + γP) is 0
            positive = ((z + epsilon).masked_fill_(~(z > 0), torch.inf), positive)
            negative = ((z - epsilon).masked_fill_(~(z < 0), torch.inf), negative)
        else:
            positive, negative = _stabilised(positive, epsilon), _stabilised(negative, epsilon)
        kept = (positive, negative, weights)
        call.keep_terms(key, kept)
    positive, negative, (w_plus, w_minus) = kept
    if not gamma_rule:
        up = _layer_input_gradient(module, x, w_plus, grad / positive)
        if type(rule) is ZPlusRule:
            return up.mul_(x)
        down = _layer_input_gradient(module, x, w_minus, grad / negative)
        return up.mul_(x).mul_(rule.alpha).sub_(down.mul_(x).mul_(rule.beta))
    weight, relevance = module.weight.detach(), None
    for (shifted, added), w_part in ((positive, w_plus), (negative, w_minus)):
        # where z > 0, z + γP ≥ z > 0 and zennit's stabiliser adds +ε (−ε on z < 0);
        # elsewhere the denominator is +∞ and the mapped gradient 0
        mapped = grad / torch.add(shifted, added, alpha=rule.gamma)
        modified = torch.add(weight, w_part, alpha=rule.gamma)
        pulled = _layer_input_gradient(module, x, modified, mapped)
        relevance = pulled if relevance is None else relevance.add_(pulled)
    return relevance.mul_(x)


def _signed_parts(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                               tuple[torch.Tensor, torch.Tensor]]:
    """``layer(x; w⁺, b⁺)``, ``layer(x; w⁻, b⁻)`` (without autograd) and ``(w⁺, w⁻)``."""
    weight, bias = module.weight.detach(), module.bias
    bias = bias.detach() if bias is not None else None
    sides = ({"min": 0}, {"max": 0})
    weights = tuple(weight.clamp(**side) for side in sides)
    with torch.no_grad():
        positive, negative = (
            _layer_with(module, x, part, bias.clamp(**side) if bias is not None else None)
            for part, side in zip(weights, sides, strict=True))
    return positive, negative, weights


def _zennit_sign(z: torch.Tensor) -> torch.Tensor:
    """The sign zennit's stabiliser uses: ``sign(z)`` with +1 for 0 (its own formula).

    >>> _zennit_sign(torch.tensor([-2.0, 0.0, 3.0]))
    tensor([-1.,  1.,  1.])
    """
    return (z == 0).to(z).add_(z.sign())


def _stabilised(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """zennit's stabiliser ``z + ε·sign(z)``, in place on ``z``; ``ε·sign`` is exact, so
    one fused ``addcmul`` rounds as zennit's two operations do."""
    return z.addcmul_(_zennit_sign(z), z.new_tensor(epsilon))


#: the functional convolution and its input gradient per number of spatial dimensions
_CONVOLUTIONS = {1: (F.conv1d, torch.nn.grad.conv1d_input),
                 2: (F.conv2d, torch.nn.grad.conv2d_input),
                 3: (F.conv3d, torch.nn.grad.conv3d_input)}


def _layer_with(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """The linear or convolution layer ``module`` on ``x`` with other weights and bias
    (convolutions with numeric zero padding, see :func:`nonnegative_layer`)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    convolution, _ = _CONVOLUTIONS[x.ndim - 2]
    return convolution(x, weight, bias, module.stride, module.padding, module.dilation,
                       module.groups)


def _layer_input_gradient(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
    """Gradient of the layer with ``weight`` at ``x`` for output gradient ``grad``: one
    transposed layer (``grad @ weight``, a matrix product for a 1×1 convolution, or a
    transposed convolution), no forward."""
    if isinstance(module, nn.Linear):
        return grad @ weight
    if module.groups == 1 and not any(module.padding) and set(weight.shape[2:]) == {1}:
        return pointwise_input_gradient(x.shape, weight, grad, module.stride)
    _, input_gradient = _CONVOLUTIONS[x.ndim - 2]
    return input_gradient(x.shape, weight, grad, module.stride, module.padding,
                          module.dilation, module.groups)


def pointwise_input_gradient(shape: torch.Size, weight: torch.Tensor, grad: torch.Tensor,
                             stride: tuple[int, ...]) -> torch.Tensor:
    """The input gradient of a 1×1 convolution (no padding, one group) with ``weight``
    (C_out, C_in, 1, ...) for ``grad`` (N, C_out, ...) at inputs of ``shape``: one
    matrix product wᵀ·grad over all pixels, put on the strided grid (zeros between).
    Same numbers as the transposed convolution up to float round-off, without its
    unfolding of the input (a third less time on ResNet-50's 1×1 layers).

    >>> w, g = torch.randn(4, 3, 1, 1), torch.randn(2, 4, 3, 3)
    >>> ours = pointwise_input_gradient(torch.Size((2, 3, 5, 5)), w, g, (2, 2))
    >>> theirs = torch.nn.grad.conv2d_input((2, 3, 5, 5), w, g, stride=2)
    >>> torch.allclose(ours, theirs, atol=1e-6)
    True
    """
    n, channels = grad.shape[:2]
    weight = weight.reshape(channels, -1).t()
    pulled = (torch.mm(weight, grad.reshape(channels, -1)) if n == 1  # a plain GEMM
              else torch.matmul(weight, grad.reshape(n, channels, -1)))
    pulled = pulled.view(n, -1, *grad.shape[2:])
    if all(s == 1 for s in stride):
        return pulled
    out = grad.new_zeros(shape)
    out[(..., *(slice(None, None, s) for s in stride))] = pulled
    return out


def flat_layer(rule: Any, module: nn.Module, call: Call,
               grad: torch.Tensor) -> torch.Tensor | None:
    """zennit's LRP-flat (:class:`~.rules.FlatRule`) on a linear or convolution layer
    with one group and numeric zero padding; ``None`` elsewhere (the caller then runs
    the rule's own terms).

    With every input and weight 1 and no bias, output j's flat value is the number of
    inputs it sees, z_j = C_in · (taps of j inside the image), the same for every output
    channel, and every input i of j's window gets m_j = grad_j / s(z_j) (zennit's
    stabiliser s). So R_i = Σ_j m_j: the mapped gradient summed over the output
    channels, then spread over each window (a transposed convolution with one 1×1×k
    kernel of ones), the same for every input channel. zennit's rule runs the layer
    with C_out · C_in kernels of ones forward and backward instead; same numbers up to
    float round-off (the sum runs in another order).
    """
    x = call.args[0]
    convolution = is_convolution(module)
    if (type(rule.stabilizer) is not float or rule.stabilizer < 0 or call.kwargs
            or (convolution and (module.groups != 1 or module.padding_mode != "zeros"
                                 or isinstance(module.padding, str)))):
        return None
    if not convolution:  # a linear layer: every output sees all C_in inputs
        count = torch.full((1,) * grad.ndim, float(x.shape[-1]), dtype=grad.dtype,
                           device=grad.device)
        summed = (grad / _stabilised(count, rule.stabilizer)).sum(-1, keepdim=True)
        return summed.expand_as(x).clone()
    _, input_gradient = _CONVOLUTIONS[x.ndim - 2]
    kernel = x.new_ones((1, 1, *module.weight.shape[2:]))
    count = window_taps(module, x.shape[2:]).to(grad).mul_(x.shape[1])  # exact: whole numbers
    summed = (grad / _stabilised(count, rule.stabilizer)).sum(1, keepdim=True)
    spread = input_gradient((x.shape[0], 1, *x.shape[2:]), kernel, summed, module.stride,
                            module.padding, module.dilation)
    return spread.expand_as(x).clone()


def window_taps(module: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    """How many kernel taps of each output position of a convolution fall inside an
    input of spatial ``size`` (not on the zero padding): (1, 1, *output size), whole
    numbers, the product of one count per dimension (no convolution is run).

    >>> window_taps(nn.Conv2d(1, 1, 3, padding=1), (3, 4))[0, 0].tolist()
    [[4, 6, 6, 4], [6, 9, 9, 6], [4, 6, 6, 4]]
    """
    count = torch.ones((), dtype=torch.long)
    for n, k, s, p, d in zip(size, module.kernel_size, module.stride, module.padding,
                             module.dilation, strict=True):
        out = (n + 2 * p - d * (k - 1) - 1) // s + 1
        where = torch.arange(out)[:, None] * s - p + torch.arange(k)[None, :] * d
        count = count[..., None] * ((where >= 0) & (where < n)).sum(1)
    return count[None, None]


def layer_rule(rule: BasicHook, module: nn.Module, call: Call,
                grad: torch.Tensor) -> torch.Tensor:
    """zennit's ``BasicHook.backward`` for a linear or convolution layer, without the
    work whose result is known (same numbers):

    * a modified input that is all zeros (x⁻ after a ReLU in z⁺, α/β, γ) gives the
      modified layer's bias as output and nothing to the relevance: no evaluation,
      no backward;
    * the unmodified term (identity input and output, ``NoMod`` parameters; γ's
      fifth term, read for the sign of z) is the layer's kept output ``z``;
    * a term whose mapped gradient is all zeros (γ's fifth) gets no backward;
    * z⁺ and α/β terms, which no parameter changes (:data:`_FIXED_TERMS`), are kept
      from the rule's second backward on a kept forward (a slider moving; a one-shot
      call keeps nothing extra) and reused by every later one.
    """
    key = _fixed_terms_key(rule)
    if key is not None and call.terms.get(key) is not None:
        inputs, outputs, state = (list(part) for part in call.terms[key])
    else:
        inputs, outputs, state = _evaluate_terms(rule, module, call, fixed=key is not None)
        if key is not None:
            call.keep_terms(key, (list(inputs), list(outputs), list(state)))
    grad_outputs = rule.gradient_mapper(grad, outputs)
    if isinstance(grad_outputs, torch.Tensor):
        grad_outputs = [grad_outputs]
    gradients = [torch.zeros_like(call.args[0])] * len(inputs)
    pick = []
    for i, kind in enumerate(state):
        if kind == "zero" or not bool(grad_outputs[i].any()):
            continue  # nothing flows back through this term
        if kind == "plain":  # its gradient is needed after all: evaluate it with a graph
            inputs[i] = inputs[i].detach().requires_grad_()
            outputs[i] = _modified_output(module, rule.param_modifiers[i],
                                          rule.output_modifiers[i], inputs[i])
        pick.append(i)
    # kept terms keep their graph for the next backward on this kept forward
    found = torch.autograd.grad([outputs[i] for i in pick], [inputs[i] for i in pick],
                                grad_outputs=[grad_outputs[i] for i in pick],
                                retain_graph=key is not None) if pick else ()
    for i, gradient in zip(pick, found, strict=True):
        gradients[i] = gradient
    return rule.reducer([t.detach() for t in inputs], gradients)


#: rules whose modified layers no rule parameter changes (ε, α, β and the stabiliser act
#: in the gradient mapper or the reducer), so their evaluations are kept per call: a
#: parameter change on a kept forward then costs only the backward of each term
_FIXED_TERMS = (ZPlusRule, AlphaBeta)


def _fixed_terms_key(rule: BasicHook) -> tuple | None:
    """What the modified layers of ``rule`` depend on, or ``None`` (not kept)."""
    if type(rule) not in _FIXED_TERMS:
        return None
    zeroed = tuple(tuple(getattr(mod, "zero_params", None) or ()) for mod in rule.param_modifiers)
    return (type(rule), zeroed)


def _evaluate_terms(rule: BasicHook, module: nn.Module, call: Call,
                    fixed: bool = False) -> tuple[list, list, list[str]]:
    """Each term's modified input and modified layer output, and how it was made:
    ``"zero"`` (all-zero input: the bias), ``"plain"`` (the kept output, no graph) or
    ``"graph"`` (evaluated with autograd).

    Zero terms are broadcast views (no memory). ``fixed`` rules (:data:`_FIXED_TERMS`,
    whose evaluations are kept) use clamps that work out of place: their input is not
    copied, each input modifier runs once, and a modified input equal to the input
    (x⁺ of a non-negative x) is the input itself, so what is kept is the outputs.
    """
    x = call.args[0] if fixed else call.args[0].clone()  # zennit's modifiers may work in place
    kept = call.z._version == call.version
    made: dict[int, torch.Tensor] = {}
    inputs, outputs, state = [], [], []
    for in_mod, param_mod, out_mod in zip(rule.input_modifiers, rule.param_modifiers,
                                          rule.output_modifiers, strict=True):
        modified_input = made.get(id(in_mod)) if fixed else None
        if modified_input is None:
            modified_input = in_mod(x)
            if fixed and modified_input is not x and torch.equal(modified_input, x):
                modified_input = x
            made[id(in_mod)] = modified_input
        if not bool(modified_input.any()):
            with ParamMod.ensure(param_mod)(module) as modified:
                bias = modified.bias
                # the layer of a zero input: its bias, broadcast
                if bias is None:
                    output = call.z.new_zeros(()).expand_as(call.z)
                else:
                    shape = (-1,) if isinstance(module, nn.Linear) else (
                        -1, *([1] * (call.z.ndim - 2)))
                    output = bias.detach().reshape(shape).expand_as(call.z)
            inputs.append(x.new_zeros(()).expand_as(x))
            outputs.append(out_mod(output))
            state.append("zero")
        elif (kept and modified_input is x and type(param_mod) is NoMod
              and not param_mod.zero_params and out_mod(call.z) is call.z):
            inputs.append(modified_input)
            outputs.append(call.z)
            state.append("plain")
        else:
            inputs.append(modified_input.detach().requires_grad_())
            outputs.append(_modified_output(module, param_mod, out_mod, inputs[-1]))
            state.append("graph")
    return inputs, outputs, state


def _modified_output(module: nn.Module, param_mod: Any, out_mod: Any,
                     modified_input: torch.Tensor) -> torch.Tensor:
    """The layer with modified parameters on ``modified_input``, with autograd."""
    with ParamMod.ensure(param_mod)(module) as modified, torch.enable_grad():
        return out_mod(modified.forward(modified_input))
