"""Method registry: every explanation method is a small registered object.

A method declares its parameters once (name, default, range, doc); the
:class:`~xaiwidgets.explainer.Explainer` uses them for validation and attrs,
the widgets use them to build sliders.  Adding a method is one class::

    @register
    class Saliency(Method):
        name = "my_saliency"
        params = (Param("power", 2.0, low=0.0, doc="exponent"),)

        def attribute(self, ctx, target, layer, power):
            return ctx.input_gradient(ctx.inputs, target) ** power
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .ops import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context

_REGISTRY: dict[str, Method] = {}
#: the values of :attr:`Method.targets`: how a method's ``target`` is resolved
TARGETS = ("resolved", "ignored", "from_own_pass")
#: class attributes that ``targets`` replaces, and the value that says the same
_REPLACED_FLAGS = {"class_agnostic": "ignored", "target_from_pass": "from_own_pass"}
#: the channel measure that is no method: each channel's activation maximum
ACTIVATION = "activation"


@dataclass(frozen=True)
class Param:
    """One method parameter: default, valid range and how a slider should show it.

    ``kind`` is ``"float"``, ``"int"``, ``"choice"`` or ``"any"`` (tensors, strings...).
    ``low``/``high`` are inclusive bounds; ``log`` asks widgets for a log-scale slider.

    >>> Param("steps", 32, kind="int", low=1).validate(8)
    8
    """

    name: str
    default: Any
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    log: bool = False
    step: float | None = None
    doc: str = ""
    optional: bool = False  # ``None`` is an accepted value

    def validate(self, value: Any) -> Any:
        """Return ``value`` converted to this parameter's type, or raise ``ValueError``."""
        if value is None and self.optional:
            return None
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(
                    f"{self.name}={value!r} is not valid; choose one of {list(self.choices)}"
                )
            return value
        if self.kind in ("float", "int"):
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"{self.name} must be a number, got {type(value).__name__} ({value!r})"
                )
            if self.kind == "int":
                if float(value) != int(value):
                    raise ValueError(f"{self.name} must be a whole number, got {value!r}")
                value = int(value)
            else:
                value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{self.name}={value} is not finite; pass a finite number")
            if self.low is not None and value < self.low:
                raise ValueError(f"{self.name}={value} is too small: it must be >= {self.low}")
            if self.high is not None and value > self.high:
                raise ValueError(f"{self.name}={value} is too large: it must be <= {self.high}")
            return value
        return check_finite(self.name, value)


def check_finite(name: str, value: Any) -> Any:
    """``value`` itself, or a ``ValueError`` when it is or holds NaN or ±inf.

    Numbers, tensors, arrays and sequences of them are checked (a baseline of NaNs
    would give a NaN map); other values pass unchanged.

    >>> check_finite("baseline", 0.5)
    0.5
    """
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) for v in value):
        bad = not all(math.isfinite(v) for v in value)
    elif isinstance(value, float):
        bad = not math.isfinite(value)
    elif isinstance(value, torch.Tensor) and value.is_floating_point():
        bad = not bool(torch.isfinite(value).all())
    elif isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        bad = not bool(np.isfinite(value).all())
    else:
        bad = False
    if bad:
        raise ValueError(
            f"{name} contains NaN or inf; pass finite values (e.g. a baseline of zeros "
            "or the images' mean)"
        )
    return value


class Method:
    """Base class of an explanation method.

    Subclasses set the class attributes and implement :meth:`attribute`, which
    gets a :class:`~xaiwidgets.core.context.Context` (model, inputs, cached passes,
    helpers), the resolved target tensor (one class index per image), the layer name
    (or ``None``) and the validated parameters, and returns a tensor of shape
    ``(N, C, H, W)``
    (pixel-space attribution, reduced later) or ``(N, H, W)`` (a map).

    >>> class AbsGradient(Method):      # decorate with @register to use it
    ...     name = "abs_gradient"
    ...     def attribute(self, ctx, target, layer):
    ...         return ctx.input_gradient(ctx.inputs, target).abs()
    >>> AbsGradient().name, AbsGradient().default_reduce
    ('abs_gradient', 'max_abs')
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    #: "max_abs" (gradient RGB rule), "sum" (signed) or "map" (already one channel)
    default_reduce: ClassVar[str] = "max_abs"
    #: True when ``layer`` is meaningful (CAM, FEM)
    uses_layer: ClassVar[bool] = False
    #: True when the map keeps a meaningful sign (diverging colormap)
    signed: ClassVar[bool] = False
    #: what ``attribute`` gets as ``target`` (one of ``registry.TARGETS``):
    #: ``"resolved"``: one class index per image, the given ones or the predicted ones
    #: (a prediction pass runs first when none is cached);
    #: ``"ignored"``: ``None``; the method ignores the target class (FEM), which, resolved
    #: after it, only labels the result;
    #: ``"from_own_pass"``: ``None`` or the given targets, unchecked; the method reads the
    #: predicted classes from its own forward pass on the images and checks given ones
    #: there (``Context.pass_target``), so a first call runs the model once, not a
    #: prediction pass plus a gradient pass (with logits cached it gets resolved targets)
    targets: ClassVar[str] = "resolved"
    #: True when ``attribute`` changes the model while it runs (no shipped method does:
    #: LRP canonizes a shadow copy); the Explainer then holds the model exclusively
    #: (other threads' calls on it wait)
    changes_model: ClassVar[bool] = False
    #: True when the method only runs the model forward, without autograd (FEM): its
    #: calls keep the model's in-place activations (see ``core.scoped.model_guard``)
    forward_only: ClassVar[bool] = False
    #: normalise the final 2-D map to [0, 1] (CAM, FEM)
    normalize_output: ClassVar[bool] = False
    #: parameter overrides for a quick run (tests, previews): few samples/steps
    quick_params: ClassVar[dict[str, Any]] = {}
    #: why the method cannot explain video clips (N, C, T, H, W); empty when it can
    clip_refusal: ClassVar[str] = ""
    #: what one count of the method's progress reports counts ("steps", "samples",
    #: "windows"): the widgets' status line while first estimates show
    progress_unit: ClassVar[str] = "steps"
    #: the kind of model the method needs (``"self-attention"``: attention rollout), empty
    #: when any classifier will do; on other models it refuses, naming the reason
    requires: ClassVar[str] = ""

    @property
    def class_agnostic(self) -> bool:
        """Whether the method ignores the target class (``targets == "ignored"``)."""
        return self.targets == "ignored"

    @property
    def has_channel_terms(self) -> bool:
        """Whether the method measures each channel of a layer (:meth:`channel_terms`)."""
        return type(self).channel_terms is not Method.channel_terms

    @property
    def has_conditional(self) -> bool:
        """Whether the method gives conditional maps (:meth:`conditional`)."""
        return type(self).conditional is not Method.conditional

    def attribute(
        self, ctx: Context, target: torch.Tensor, layer: str | None, **params: Any
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """The raw attribution: ``(N, C, H, W)`` in pixel space or ``(N, h, w)`` a map."""
        raise NotImplementedError

    def channel_terms(self, ctx: Context, target: torch.Tensor | None, layer: str,
                      **params: Any) -> torch.Tensor:
        """Each channel's contribution at ``layer`` (N, C) (``Explainer.channels``);
        methods that decompose over a layer's channels override it."""
        raise ValueError(f"method {self.name!r} has no channel measure; use one of "
                         f"{channel_measures()}")

    def conditional(self, ctx: Context, target: torch.Tensor | None, layer: str,
                    channels: torch.Tensor, **params: Any) -> torch.Tensor:
        """The map with only ``channels`` of ``layer`` contributing (``explain(...,
        channels=[...])``), shaped like :meth:`attribute`'s; methods that have one
        override it."""
        raise ValueError(f"method {self.name!r} has no conditional map (channels=); use one "
                         f"of {conditional_methods()}")

    def check(self, ctx: Context, layer: str | None, params: dict[str, Any]) -> None:
        """Preconditions, checked by the Explainer before :meth:`attribute`.

        Raise ``ValueError`` naming what is missing when the method cannot give a
        meaningful result on this model (guided backprop without ReLUs), or warn when
        the result is only approximate. Default: no preconditions.
        """

    def default_layer(self, ctx: Context) -> str | None:
        """The layer used when the caller gives none (only for ``uses_layer`` methods)."""
        return ctx.default_layer() if self.uses_layer else None

    def param(self, name: str) -> Param:
        """The declared :class:`Param` called ``name`` (``KeyError`` when there is none)."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, unknown names rejected, values validated."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            allowed = ", ".join(known) or "none"
            raise TypeError(
                f"method {self.name!r} does not take parameter(s) {unknown}; "
                f"its parameters are: {allowed}"
            )
        out = {}
        for name, p in known.items():
            out[name] = p.validate(given[name]) if name in given else p.default
        return self.check_params(out)

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Hook for cross-parameter rules (e.g. alpha - beta = 1). Returns the params."""
        return params

    def bind(self, ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
        """Hook for defaults that depend on the model (e.g. MLFEM's layers). Returns the params."""
        return params


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a :class:`Method` subclass under its ``name``.

    Then ``xw.explain(..., "abs_gradient")``, ``xw.methods()`` and the widgets know it::

        @register
        class AbsGradient(Method):
            name = "abs_gradient"

            def attribute(self, ctx, target, layer):
                return ctx.input_gradient(ctx.inputs, target).abs()
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.targets not in TARGETS:
        raise ValueError(f"{cls.__name__}.targets={cls.targets!r} is not valid; choose one "
                         f"of {list(TARGETS)}")
    for klass in cls.__mro__[:-1]:
        for flag, value in _REPLACED_FLAGS.items():
            if flag in vars(klass) and klass is not Method:
                raise TypeError(f"{klass.__name__}.{flag} is no longer read: declare "
                                f"targets = {value!r} instead (see Method.targets)")
    _REGISTRY[cls.name] = cls()
    return cls


def methods() -> list[str]:
    """Names of every registered method, in registration order.

    >>> methods()[:3]
    ['gradient', 'guided_backprop', 'deconvnet']
    """
    return list(_REGISTRY)


def channel_measures() -> list[str]:
    """The channel measures of ``Explainer.channels``: the methods with
    :meth:`Method.channel_terms`, then :data:`ACTIVATION` (no method).

    >>> channel_measures()
    ['gradcam', 'lrp', 'fem', 'activation']
    """
    return [n for n, m in _REGISTRY.items() if m.has_channel_terms] + [ACTIVATION]


def conditional_methods() -> list[str]:
    """The methods that give a conditional map (``explain(..., channels=[...])``).

    >>> conditional_methods()
    ['gradcam', 'guided_gradcam', 'lrp', 'fem']
    """
    return [n for n, m in _REGISTRY.items() if m.has_conditional]


def layer_methods() -> list[str]:
    """The methods that take ``layer=`` (``Method.uses_layer``).

    >>> layer_methods()
    ['gradcam', 'guided_gradcam', 'fem']
    """
    return [n for n, m in _REGISTRY.items() if m.uses_layer]


def get_method(name: str) -> Method:
    """The registered method called ``name``; a clear error lists the known ones.

    >>> [p.name for p in get_method("fem").params]
    ['K']
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(did_you_mean("method", name, list(_REGISTRY)))
    return _REGISTRY[name]
