"""The typed context a method receives: inputs, cached passes, gradient helpers.

A method never sees the :class:`~xaiwidgets.explainer.Explainer`; it gets a
:class:`Context` holding the model, the (validated) images and model inputs, and
the passes it may need: cached logits and layer activations, input and layer
gradients in bounded chunks, scores of many perturbed inputs, and progress
reporting (the widgets' cancellation point).

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU(),
...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
>>> ctx = Context(model, torch.rand(1, 3, 8, 8))
>>> ctx.logits().shape
torch.Size([1, 2])
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from . import layers as _layers
from . import probe as _probe
from . import tokens as _tokens
from .ops import per_image, pick_logits
from .scoped import (
    RecordOverwritten,
    Scope,
    capture,
    counting_nonlinearities,
    model_guard,
    own_output,
)

T = TypeVar("T")

#: per model, the layers whose outputs it changes in place after they are made (an
#: in-place ReLU after a BatchNorm): passes without autograd copy those records at once
_OVERWRITTEN: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
_OVERWRITTEN_LOCK = threading.Lock()
ProgressCallback = Callable[[int, int], None]
#: which part of a model's output holds the logits: an index, a key or a callable
OutputSelector = int | str | Callable[[Any], torch.Tensor] | None
#: ``partial(done, total, estimate)``: ``estimate()`` gives the raw attribution from the
#: first ``done`` of ``total`` samples/steps (computed only when called)
PartialCallback = Callable[[int, int, Callable[[], torch.Tensor]], None]


class _PassDone(Exception):
    """Raised by a forward hook to end a pass whose remaining layers are not needed."""


class Context:
    """Inputs and cached passes of one model on one batch of images.

    Parameters
    ----------
    model
        The classifier, returning logits ``(N, classes)``.
    images
        Validated display images ``(N, C, H, W)`` (what the user passed).
    preprocess
        Maps display images to the model input, or ``None`` (images are the input).
    progress
        ``True``/``False`` for a tqdm bar on long work, or a callable ``(done, total)``.
    grid
        Token grids the model does not tell (:mod:`~xaiwidgets.core.tokens`): ``(h, w)``
        or ``{layer: (h, w)}``; ``None`` reads them from the model and the input size.

    Result attrs: a method adds facts about its result (a check it made, e.g.
    DeepLIFT's ``delta_error`` or LRP's ``conservation_error``) with
    :meth:`record`; the Explainer opens :meth:`recording` around ``attribute`` and
    puts what was recorded into the result's ``attrs``. Records are per thread, so
    one Context can serve several threads::

        def attribute(self, ctx, target, layer, **params):
            attribution = ...
            ctx.record("delta_error", 0.003)   # -> result.attrs["delta_error"]
            return attribution
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        progress: bool | ProgressCallback = False,
        output: OutputSelector = None,
        grid: _tokens.GridOption = None,
    ) -> None:
        self.model = model
        #: the user's token grids (see :meth:`layer_grid`)
        self.grid = grid
        self._grids: tuple[dict[str, _tokens.Grid], dict[str, str]] | None = None
        self.images = images
        self.preprocess = preprocess
        self.progress = progress
        #: which part of a tuple/dict model output holds the logits (see :meth:`select_output`)
        self.output = output
        #: True when the model returns a single logit (a binary classifier)
        self.binary = False
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._nonlinearities: Counter[str] = Counter()
        #: how many times each module ran in the :meth:`shapes` pass
        self._calls: Counter[str] = Counter()
        #: number of classes seen by the :meth:`shapes` pass (0 before it)
        self.probe_classes = 0
        # set by callers that show first estimates (the widgets): :meth:`partial_results`
        self._partial: PartialCallback | None = None
        self.inputs = preprocess(images) if preprocess is not None else images
        self._records = threading.local()
        self.clear_cache()

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, Any]]:
        """Collect this thread's :meth:`record` calls made inside the block into a dict.

        >>> ctx = Context(torch.nn.Flatten(), torch.rand(1, 3, 4, 4))
        >>> with ctx.recording() as extra:
        ...     ctx.record("delta_error", 0.5)
        >>> extra
        {'delta_error': 0.5}
        """
        stack = self._records.__dict__.setdefault("stack", [])
        stack.append({})
        try:
            yield stack[-1]
        finally:
            stack.pop()

    def record(self, name: str, value: Any) -> None:
        """Add ``name = value`` to the attrs of the result being computed (this thread).

        Outside :meth:`recording` (a method called directly) the value is dropped.
        """
        stack = getattr(self._records, "stack", None)
        if stack:
            stack[-1][name] = value

    def clear_cache(self) -> None:
        """Forget cached logits, activations and :meth:`memo` entries (done automatically
        when weights change; new images make a new Context)."""
        self._cache = {"fingerprint": self._fingerprint(), "acts": {}, "memo": {},
                       "building": {}}

    def memo(self, owner: Hashable, key: Hashable, build: Callable[[], T],
             limit: int | None = None) -> T:
        """``build()``, computed once per ``(owner, key)`` and kept with the cache.

        ``owner`` is whoever keeps the value (a method class, a function or a
        module-level token): two owners never see each other's entries, whatever their
        keys. ``key`` holds what determines the value (layers, K, targets...). Entries
        go with the cache: new weights, :meth:`clear_cache`, new images (a new
        Context). Threads asking for one entry at once run ``build`` once. ``limit``
        keeps at most that many of ``owner``'s entries (the oldest goes first).

        >>> ctx = Context(torch.nn.Flatten(), torch.rand(1, 3, 1, 1))
        >>> ctx.memo(len, "k", lambda: 1), ctx.memo(len, "k", lambda: 2)
        (1, 1)
        >>> ctx.memo(str, "k", lambda: 2)  # another owner, same key
        2
        """
        cache = self.valid_cache()
        store, slot = cache["memo"], (owner, key)
        if slot in store:
            return store[slot]
        # dict.setdefault is atomic: threads building one slot share its lock
        with cache["building"].setdefault(slot, threading.Lock()):
            if slot not in store:
                value = build()
                if limit is not None:
                    mine = [s for s in list(store) if s[0] == owner]
                    for old in mine[:max(0, len(mine) - limit + 1)]:
                        store.pop(old, None)
                store[slot] = value
            return store[slot]

    def memoized(self, owner: Hashable, key: Hashable) -> Any:
        """The :meth:`memo` entry of ``(owner, key)``, or ``None`` when there is none
        (nothing is built)."""
        return self.valid_cache()["memo"].get((owner, key))

    def cached_logits(self) -> torch.Tensor | None:
        """The images' logits if a pass has cached them, else ``None`` (runs nothing)."""
        return self.valid_cache().get("logits")

    def _fingerprint(self) -> tuple:
        # parameters edited in place bump their version counter: the cache then
        # refers to another model and must go (sanity checks randomise weights)
        return tuple((id(t), t._version) for t in self.model.state_dict(keep_vars=True).values())

    def valid_cache(self) -> dict[str, Any]:
        if self._cache.get("fingerprint") != self._fingerprint():
            self.clear_cache()
        return self._cache

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, ...]:
        """The inputs' spatial size (H, W), or (T, H, W) for video clips."""
        return tuple(int(s) for s in self.inputs.shape[2:])

    @property
    def is_clip(self) -> bool:
        """True for video clips (N, C, T, H, W)."""
        return self.inputs.ndim == 5

    def forward(
        self,
        x: torch.Tensor | None = None,
        layers: Sequence[str] = (),
        grad: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One model pass on ``x`` (default: the inputs), recording ``layers``' outputs.

        Runs in eval mode with hooks that are removed on exit. With ``grad=False``
        it runs without autograd. Not cached: see :meth:`logits` and :meth:`activations`.
        """
        x = self.inputs if x is None else x
        out, acts = self._pass(x, layers, grad)
        logits = self.select_output(out)
        if grad and self.is_inputs(x):
            # a gradient pass on the images themselves fills the prediction and activation
            # cache, so the first explanation runs the model once, and predict() never
            cache = self.valid_cache()
            cache.setdefault("logits", logits.detach())
            for name, activation in acts.items():
                cache["acts"].setdefault(name, activation.detach())
        return logits, dict(acts)

    def _pass(self, x: torch.Tensor, layers: Sequence[str], grad: bool,
              stop: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
        """The model's raw output on ``x`` and the outputs of ``layers``.

        ``stop=True`` (without autograd) ends the pass once the last of ``layers`` has
        made its last output (as counted by the :meth:`shapes` pass): the rest of the
        network does not run and the output is ``None``.
        """
        modules = {name: _layers.resolve_layer(self.model, name) for name in layers}
        # without autograd the records are not copied (MLFEM records 16 blocks); a
        # model that changes a recorded output in place (its in-place ReLU after a
        # recorded BatchNorm) gets a second, copying pass, and copies from then on
        copies = (True,) if grad or not modules or self._overwritten(modules) else (False, True)
        for copy in copies:
            context = torch.enable_grad() if grad else torch.no_grad()
            try:
                with (model_guard(self.model, keep_inplace=not grad),
                      capture(modules, detach=not grad, copy=copy)
                      as acts, context, Scope() as scope):
                    stopper = self._stopper(modules) if stop and not grad else None
                    if stopper is not None:  # after capture's hooks: the record comes first
                        scope.handle(stopper[0].register_forward_hook(stopper[1]))
                    try:
                        out = self.model(x)
                    except _PassDone:
                        out = None
                break
            except RecordOverwritten as error:
                with _OVERWRITTEN_LOCK:
                    _OVERWRITTEN.setdefault(self.model, set()).update(error.layers)
                continue
        return out, dict(acts)

    def _overwritten(self, modules: dict[str, nn.Module]) -> bool:
        """Whether a pass may change one of ``modules``' outputs in place after it is
        made: an affine layer's (an in-place ReLU often follows a convolution or a
        BatchNorm), or one an earlier pass saw changed."""
        return (any(isinstance(m, _layers.AFFINE) for m in modules.values())
                or bool(_OVERWRITTEN.get(self.model, set()) & modules.keys()))

    def _stopper(self, modules: dict[str, nn.Module]) -> tuple[nn.Module, Callable] | None:
        """The last of ``modules`` to finish and a forward hook that ends the pass at its
        last call, or ``None`` when the :meth:`shapes` pass cannot tell (not run yet,
        or a module it did not see)."""
        if self._shapes is None or not modules or not set(modules) <= self._shapes.keys():
            return None
        order = {name: position for position, name in enumerate(self._shapes)}
        last = max(modules, key=order.__getitem__)
        owner, calls, seen = threading.get_ident(), self._calls[last], [0]

        def hook(_module: nn.Module, _inputs: Any, _output: Any) -> None:
            if threading.get_ident() == owner:
                seen[0] += 1
                if seen[0] == calls:
                    raise _PassDone

        return modules[last], hook

    def select_output(self, out: Any) -> torch.Tensor:
        """The logits ``(N, classes)`` in a model's output ``out``.

        ``output`` (given to the Explainer) picks them from a tuple/list (an index), a
        dict or an object with attributes (a key) or anything (a callable). A single
        logit ``z`` (N, 1) is a binary classifier: it becomes ``(N, 2) = [-z, z]``, so
        class 1 is explained by ``z``, class 0 by ``-z``, and :meth:`probabilities`
        gives ``sigmoid(z)`` and ``1 - sigmoid(z)``.
        """
        logits, self.binary = pick_logits(out, self.output)
        return logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of ``logits``: softmax, or the sigmoid of a binary model's logit.

        >>> ctx = Context(torch.nn.Flatten(), torch.rand(1, 3, 1, 1))
        >>> round(ctx.probabilities(torch.tensor([[0.0, 2.0, 0.0]])).sum().item(), 6)
        1.0
        """
        return torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=1)

    def log_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """log :meth:`probabilities`, computed stably (log-softmax, or log-sigmoid of a
        binary model's logit): finite for classes whose probability underflows.

        >>> ctx = Context(torch.nn.Flatten(), torch.rand(1, 3, 1, 1))
        >>> ctx.log_probabilities(torch.tensor([[0.0, 200.0]]))[0, 0].item()
        -200.0
        """
        if self.binary:  # logits are [-z, z]: p(1) = sigmoid(z), p(0) = sigmoid(-z)
            return torch.nn.functional.logsigmoid(logits)
        return torch.log_softmax(logits, dim=1)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shape of every module, in the order they finish (one pass on one image).

        Cached, and remembered per model and input shape (:mod:`~xaiwidgets.core.probe`):
        a new Context on a model already probed with inputs of this shape runs no pass.
        The default layer and the FEM stack are chosen from these shapes.
        Modules that do not run (auxiliary heads in eval mode) are absent.
        """
        if self._shapes is None:
            # a model already probed with inputs of this shape is not run again
            key = _probe.probe_key(self.model, self.inputs, self.output)
            known = _probe.recall(self.model, key)
            if known is None:
                known = self._probe()
                _probe.remember(self.model, key, known)
            self._calls, self._nonlinearities = known.calls, known.nonlinearities
            self.probe_classes, self.binary = known.classes, known.binary
            self._shapes = known.shapes
        return self._shapes

    def _probe(self) -> _probe.Probe:
        """One pass on the first image: shapes, calls, non-linearities and classes."""
        calls: Counter[str] = Counter()
        seen: dict[str, Any] = {}

        def run() -> None:
            # the same pass also counts the non-linearities (methods' preconditions)
            with counting_nonlinearities() as found:
                logits, _ = self.forward(self.inputs[:1])
            seen.update(found=found, classes=int(logits.shape[1]), binary=self.binary)
            if self.n_images == 1:  # the probe was the whole batch (widgets): keep it
                self.keep_logits(logits)

        shapes = _layers.output_shapes(self.model, run, calls)
        return _probe.Probe(shapes, calls, seen["found"], seen["classes"], seen["binary"])

    def nonlinearities(self) -> Counter[str]:
        """The non-linearities the model calls, by name and count (from :meth:`shapes`'s
        one-image pass: no pass of its own)."""
        self.shapes()
        return self._nonlinearities

    def is_inputs(self, x: torch.Tensor) -> bool:
        """Whether ``x`` holds the model inputs themselves (a view of the same storage)."""
        inputs = self.inputs
        return x is inputs or (x.shape == inputs.shape and x.stride() == inputs.stride()
                               and x.data_ptr() == inputs.data_ptr()
                               and x.storage_offset() == inputs.storage_offset())

    @staticmethod
    def pass_target(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """``target`` checked against this pass's ``logits``, or (``None``) their
        predicted classes.

        Methods whose ``Method.targets`` is ``"from_own_pass"`` get targets before any
        prediction pass: ``None`` or explicit targets whose range only this pass can check.
        """
        if target is None:
            return logits.detach().argmax(dim=1)
        return Context.check_target(target, logits.shape[1])

    def keep_logits(self, logits: torch.Tensor) -> None:
        """Offer the images' logits from a method's own pass (e.g. DeepLIFT's image rows
        of its image + reference batch, LRP's canonized pass) to the prediction cache,
        kept unless logits are cached already: :meth:`predict` then runs nothing.

        >>> ctx = Context(torch.nn.Flatten(), torch.rand(1, 3, 1, 1))
        >>> ctx.keep_logits(torch.tensor([[0.0, 1.0, 2.0]]))
        >>> ctx.logits().tolist()
        [[0.0, 1.0, 2.0]]
        """
        self.valid_cache().setdefault("logits", logits.detach())

    def logits(self) -> torch.Tensor:
        """Cached logits (N, classes) of the images (one forward pass, no autograd)."""
        cache = self.valid_cache()
        if "logits" not in cache:
            cache["logits"], _ = self.forward()
        return cache["logits"]

    def activations(self, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cached outputs of ``layers`` (detached); runs the model only for missing layers.

        Token and channels-last outputs come as (N, C, h, w) (:meth:`layer_grid`).
        The pass also fills the prediction cache; when the logits are cached already,
        it stops after the last missing layer (the rest of the network is not run).
        """
        grids = {name: self.layer_grid(name) for name in layers}  # ambiguous: fails first
        cache = self.valid_cache()
        missing = [name for name in layers if name not in cache["acts"]]
        if missing and "logits" in cache:
            _, acts = self._pass(self.inputs, missing, grad=False, stop=True)
            cache["acts"].update(acts)
        elif missing:
            logits, acts = self.forward(layers=missing)
            cache["acts"].update(acts)
            cache.setdefault("logits", logits)
        return {name: grids[name].to_map(cache["acts"][name]) for name in layers}

    @property
    def num_classes(self) -> int:
        """Number of classes (the logits' width): from the construction probe, no pass."""
        if not self.probe_classes:
            self.shapes()
        return self.probe_classes

    def layers(self) -> list[str]:
        """Names usable as ``layer=``, in forward order: convolutions and block outputs."""
        names = _layers.candidate_layers(self.model, self.map_shapes())
        try:
            default = self.default_layer()
        except ValueError:
            return names
        if default not in names:  # a class-token model's last norm: just before its block
            block = next((n for n in names if default.startswith(n + ".")), None)
            names.insert(names.index(block) if block else len(names), default)
        return names

    def block_layers(self) -> list[str]:
        """The block outputs (residual blocks, or each conv's activation): MLFEM's layers."""
        return _layers.block_outputs(self.model, self.map_shapes())

    def default_layer(self) -> str:
        """The last layer with a spatial (≥ 2×2) output: the default of Grad-CAM and FEM.

        Token models whose head reads a class token: the last block's first layer
        norm (:func:`~xaiwidgets.core.tokens.class_token_layer`).
        """
        grids, ambiguous = self.grids()
        try:
            chosen = _layers.default_layer(self.model, self.map_shapes())
        except ValueError as error:
            if not ambiguous:
                raise
            first = next(iter(ambiguous.values()))
            raise _tokens.TokenGridError(f"no layer with a known feature-map grid: {first}"
                                         ) from error
        return _tokens.class_token_layer(self.model, chosen, grids)

    def grids(self) -> tuple[dict[str, _tokens.Grid], dict[str, str]]:
        """Every feature-map layer's :class:`~xaiwidgets.core.tokens.Grid` and the
        ambiguous token layers (name: how to give the grid); from :meth:`shapes`' pass."""
        if self._grids is None:
            self._grids = _tokens.layouts(self.model, self.shapes(), self.size[-2:], self.grid)
        return self._grids

    def map_shapes(self) -> dict[str, tuple[int, ...]]:
        """:meth:`shapes` with token and channels-last outputs as (N, C, h, w), in the
        same order; ambiguous token layers left out."""
        grids, ambiguous = self.grids()
        return {name: grids[name].map_shape(shape) if name in grids else shape
                for name, shape in self.shapes().items() if name not in ambiguous}

    def layer_grid(self, layer: str) -> _tokens.Grid:
        """How ``layer``'s output reads as (N, C, h, w); raises
        :class:`~xaiwidgets.core.tokens.TokenGridError` for an ambiguous token layer."""
        grids, ambiguous = self.grids()
        if layer in ambiguous:
            raise _tokens.TokenGridError(ambiguous[layer])
        return grids.get(layer, _tokens.Grid("map"))

    def resolve_target(self, target: Any) -> torch.Tensor:
        """One class index per image: ``None`` = predicted class; int; or a sequence."""
        if target is None:
            return self.logits().argmax(dim=1)
        return self.check_target(self.parse_target(target), self.num_classes)

    def parse_target(self, target: Any) -> torch.Tensor:
        """Explicit targets as one class index per image, checked for type and count
        only (no pass needed; :meth:`check_target` checks the range)."""
        n = self.n_images
        if isinstance(target, (torch.Tensor, np.ndarray)):
            target = target.tolist()
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            values = [int(target)] * n
        elif isinstance(target, (list, tuple)):
            if len(target) != n:
                raise ValueError(
                    f"got {len(target)} targets for {n} images; pass one int per image, "
                    "a single int, or None for the predicted classes"
                )
            if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                       for t in target):
                raise TypeError(f"targets must be class indices (ints), got {target!r}")
            values = [int(t) for t in target]
        else:
            raise TypeError(
                f"target must be an int, a sequence of ints or None, got {type(target).__name__}"
            )
        return torch.tensor(values, device=self.device, dtype=torch.long)

    @staticmethod
    def check_target(target: torch.Tensor, classes: int) -> torch.Tensor:
        """``target`` itself, or a clear error when a class index is out of range."""
        bad = [t for t in target.tolist() if not 0 <= t < classes]
        if bad:
            raise ValueError(
                f"target class {bad[0]} is out of range: the model has {classes} classes "
                f"(valid: 0..{classes - 1})"
            )
        return target

    # ------------------------------------------------------------ gradients
    def input_gradient(
        self, x: torch.Tensor, target: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """∂ logit[target] / ∂ x for a batch ``x`` (one target per row), in chunks.

        Chunks of ``batch_size`` rows bound memory (IG steps, SmoothGrad samples).
        ``target=None`` means the predicted classes.
        Call inside a ``relu_backward`` block for guided backprop / DeconvNet.
        """
        batch_size = batch_size or len(x)
        if target is None and not (self.is_inputs(x) and batch_size >= len(x)):
            target = self.resolve_target(None)  # predicted classes need the clean pass
        grads = torch.empty_like(x)
        chunks = range(0, len(x), batch_size)
        for done, start in enumerate(chunks, 1):
            stop = start + batch_size
            xb = x[start:stop].detach().requires_grad_(True)
            logits, _ = self.forward(xb, grad=True)
            rows = self.pass_target(logits, None if target is None else target[start:stop])
            score = logits.gather(1, rows[:, None]).sum()
            (grads[start:stop],) = torch.autograd.grad(score, xb)
            self.report_progress(done, len(chunks))
        return grads

    def summed_input_gradient(
        self,
        sample: Callable[[int], torch.Tensor],
        n: int,
        target: torch.Tensor,
        batch_size: int | None = None,
        estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Σ_k ∂ logit[target] / ∂ x at the inputs ``sample(k)``, k < n; (N, C, H, W).

        ``sample(k)`` returns the k-th sample of every image, shaped like the inputs.
        The n·N rows run ``batch_size`` at a time and each sample is built only when
        its rows are due, so memory is bounded by ``batch_size`` whatever ``n`` is
        (IG steps, SmoothGrad samples). Call inside ``relu_backward`` for the ReLU rules.
        ``estimate(summed, counts)`` turns a partial sum (``counts``: samples summed per
        image, (N, 1, 1, 1)) into the method's attribution; it is offered to
        :meth:`report_partial` after every chunk but the last.
        """
        n_img = self.n_images
        total = n * n_img
        batch_size = batch_size or total
        summed = torch.zeros_like(self.inputs)
        pending: list[torch.Tensor] = []  # rows built but not run yet, in row order
        n_pending, k, row = 0, 0, 0
        n_chunks = -(-total // batch_size)
        for done in range(1, n_chunks + 1):
            while n_pending < batch_size and k < n:
                pending.append(sample(k))
                n_pending, k = n_pending + n_img, k + 1
            rows = torch.cat(pending) if len(pending) > 1 else pending[0]
            take = min(batch_size, n_pending)
            pending = [rows[take:]] if take < n_pending else []
            n_pending -= take
            xb = rows[:take].detach().requires_grad_(True)
            image = torch.arange(row, row + take, device=xb.device) % n_img
            logits, _ = self.forward(xb, grad=True)
            (grad,) = torch.autograd.grad(logits.gather(1, target[image, None]).sum(), xb)
            # add each row's gradient to its image's sum; a one-hot matmul is
            # deterministic on GPUs, unlike index_add_
            onehot = torch.nn.functional.one_hot(image, n_img).to(grad.dtype)
            summed += (onehot.T @ grad.flatten(1)).view_as(summed)
            row += take
            if estimate is not None and done < n_chunks:
                counts = ((row - torch.arange(n_img, device=xb.device) + n_img - 1) // n_img)
                counts = per_image(counts.clamp(min=1).to(summed.dtype), summed)
                # a snapshot of the running sum, turned into a map only if someone draws it
                self.report_partial(row // n_img, n,
                                    functools.partial(estimate, summed.clone(), counts))
            self.report_progress(done, n_chunks)
        return summed

    def layer_gradient(
        self, layer: str, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation of ``layer`` and ∂ logit[target] / ∂ activation, both (N, C, h, w)
        (token and channels-last outputs rearranged by :meth:`layer_grid`).

        ``target=None`` means the predicted classes (read from this very pass).
        Autograd records only the part of the network after ``layer`` (see
        :meth:`forward_from`): the partial derivative is the same, the pass is cheaper.
        """
        grid = self.layer_grid(layer)  # an ambiguous token layer fails before any pass
        logits, activation = self.forward_from(layer)
        score = logits.gather(1, self.pass_target(logits, target)[:, None]).sum()
        (grad,) = torch.autograd.grad(score, activation)
        return grid.to_map(activation.detach()), grid.to_map(grad)

    def forward_from(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the inputs with autograd from ``layer`` on, and that layer's output.

        The pass runs without autograd up to ``layer``; a forward hook there makes its
        output a leaf that requires grad, hands the rest of the network a copy of it
        (so later in-place operations such as ResNet's ``out += identity`` are fine)
        and turns autograd on for the rest of this thread's pass (the ``no_grad`` block
        restores the mode on exit). ``∂ logits / ∂ output`` is then exactly the
        gradient a full autograd pass gives: other paths are constants for a partial
        derivative. A layer called several times in one pass gives its last call's
        output (autograd is on from its first call). Fills the prediction and
        activation cache.

        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU(),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        >>> logits, out = Context(model, torch.rand(1, 3, 8, 8)).forward_from("1")
        >>> out.requires_grad, out.grad_fn is None, logits.requires_grad
        (True, True, True)
        """
        module = _layers.resolve_layer(self.model, layer)
        owner = threading.get_ident()
        leaves: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor | None:
            output = own_output(owner, layer, output)
            if output is None:  # another thread's pass on the same model
                return None
            leaves.append(output.detach().requires_grad_())
            torch.set_grad_enabled(True)  # this thread only; undone by no_grad's exit
            return leaves[-1].clone()

        with model_guard(self.model), Scope() as scope:
            scope.handle(module.register_forward_hook(hook))
            with torch.no_grad():
                out = self.model(self.inputs)
        if not leaves:
            raise ValueError(
                f"layer {layer!r} did not run in the model's forward pass (an auxiliary "
                "head?); pick a layer from Explainer.layers()"
            )
        logits = self.select_output(out)
        cache = self.valid_cache()
        cache.setdefault("logits", logits.detach())
        cache["acts"].setdefault(layer, leaves[-1].detach())
        return logits, leaves[-1]

    def scores(self, x: torch.Tensor, target: torch.Tensor, batch_size: int = 64,
               softmax: bool = False) -> torch.Tensor:
        """Target logits (or probabilities) of many inputs ``x`` without autograd, in chunks.

        ``target`` is one class per row of ``x`` (or a single class for all rows).
        The images themselves are scored from the cached logits (a pass fills the cache).
        """
        if target.ndim == 0 or len(target) == 1:
            target = target.reshape(1).expand(len(x))
        if self.is_inputs(x):
            logits = self.logits()
            logits = self.probabilities(logits) if softmax else logits
            return logits.gather(1, target[:, None])[:, 0]
        out = []
        chunks = range(0, len(x), batch_size)
        for done, start in enumerate(chunks, 1):
            logits, _ = self.forward(x[start:start + batch_size])
            if softmax:
                logits = self.probabilities(logits)
            out.append(logits.gather(1, target[start:start + batch_size, None])[:, 0])
            if len(chunks) > 1:  # a one-chunk call is a step of its caller's progress loop
                self.report_progress(done, len(chunks))
        return torch.cat(out)

    def report_progress(self, done: int, total: int) -> None:
        """Forward progress to the callback, if the caller gave one."""
        if callable(self.progress):
            self.progress(done, total)

    @contextlib.contextmanager
    def partial_results(self, callback: PartialCallback | None) -> Iterator[None]:
        """Offer first estimates (:meth:`report_partial`) to ``callback`` inside the block;
        ``None`` offers none. The previous callback is back on exit.

        >>> ctx = Context(torch.nn.Flatten(), torch.rand(1, 3, 1, 1))
        >>> seen = []
        >>> with ctx.partial_results(lambda done, total, estimate: seen.append(estimate())):
        ...     ctx.wants_partial, ctx.report_partial(1, 2, lambda: 0.5)
        (True, None)
        >>> seen, ctx.wants_partial
        ([0.5], False)
        """
        previous, self._partial = self._partial, callback
        try:
            yield
        finally:
            self._partial = previous

    @property
    def wants_partial(self) -> bool:
        """Whether someone shows first estimates (a method may then skip making them)."""
        return self._partial is not None

    def report_partial(self, done: int, total: int,
                       estimate: Callable[[], torch.Tensor]) -> None:
        """Offer a first estimate after ``done`` of ``total`` steps to the
        :meth:`partial_results` callback, if any.

        ``estimate()`` returns the raw attribution so far (what ``attribute`` would
        return); it runs only if the callback asks for it.
        """
        if self._partial is not None:
            self._partial(done, total, estimate)

    def progress_bar(self, iterable: Any, total: int, desc: str) -> Any:
        """Wrap long loops in tqdm (when ``progress=True``) or the callback."""
        if callable(self.progress):
            def tracked():
                for i, item in enumerate(iterable, 1):
                    yield item
                    self.progress(i, total)
            return tracked()
        if self.progress and total >= 20:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False)
        return iterable
