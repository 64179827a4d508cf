"""What is timed for each method: ours, the reference libraries, and the physical limit.

A :class:`Case` holds three kinds of zero-argument callables on the same model, input
and explicit targets:

* ``ours`` — ``Explainer.explain`` on one re-used :class:`xaiwidgets.Explainer`;
* ``peers`` — the same computation in Captum, Zennit or pytorch-grad-cam, with the
  same steps / samples / window / rows per model call;
* ``limit`` — the bare torch passes the method cannot avoid (e.g. gradient = one
  forward and one backward), written without any library.

A method or a library that is missing gives ``None`` ("n/a" in the table), never an error.

>>> cfg = Config.for_device("cpu")
>>> cfg.steps, cfg.samples
(4, 4)
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import xaiwidgets as xw

Fn = Callable[[], object]


@dataclass(frozen=True)
class Config:
    """Sizes of the sampled methods, identical for ours, the peers and the limit."""

    steps: int = 32          # integrated gradients steps
    samples: int = 25        # SmoothGrad noise samples
    chunk: int = 64          # rows per model call (IG, SmoothGrad, occlusion, LIME)
    window: int = 32         # occlusion window (px)
    stride: int = 16         # occlusion stride (px)
    lime_samples: int = 64   # LIME perturbations per image
    lime_segments: int = 50  # SLIC superpixels
    mp_steps: int = 20       # meaningful perturbation optimiser steps
    sigma: float = 0.15      # SmoothGrad noise, fraction of x.max() - x.min()

    @classmethod
    def for_device(cls, device: str, size: int = 224) -> Config:
        """Defaults: method-like sizes on a GPU, a few steps on a small CPU so the
        default run stays within minutes (same sizes for every implementation)."""
        if device.startswith("cuda"):
            return cls()
        return cls(steps=4, samples=4, chunk=16, window=size // 2, stride=size // 2,
                   lime_samples=8, lime_segments=25, mp_steps=3)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Case:
    """One method's contenders. ``ours``/``limit`` are ``None`` when unavailable."""

    method: str
    params: dict[str, Any]
    ours: Fn | None
    limit: Fn | None
    limit_doc: str
    peers: dict[str, Fn | None] = field(default_factory=dict)
    #: how a peer differs from ours, when it is not the same computation
    peer_note: str = ""
    #: the method reads cached activations: drop them before each timed call of ours
    cold_cache: bool = False


# ---------------------------------------------------------------- bare torch passes
def score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of the target logits: backward of it gives every row's own gradient."""
    return logits.gather(1, target[:, None]).sum()


def forward_backward(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One forward with autograd and one backward to the input."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(model(x), target), x)
    return grad


def forwards(model: nn.Module, x: torch.Tensor, rows: int, chunk: int) -> None:
    """``rows`` forward rows without autograd, ``chunk`` rows per call (inputs are
    repeats of ``x``: the cost of a forward does not depend on pixel values)."""
    full = x.repeat(math.ceil(chunk / len(x)), 1, 1, 1)[:chunk]
    with torch.no_grad():
        for start in range(0, rows, chunk):
            model(full[: min(chunk, rows - start)])


@dataclass
class Setup:
    """Model, input and targets shared by every case."""

    model: nn.Module
    x: torch.Tensor          # model input (N, 3, H, W)
    target: torch.Tensor     # (N,) class indices, explicit
    explainer: xw.Explainer
    cfg: Config

    @property
    def layer(self) -> str:
        return self.explainer.default_layer()

    @property
    def module(self) -> nn.Module:
        return dict(self.model.named_modules())[self.layer]

    @property
    def targets(self) -> list[int]:
        return [int(t) for t in self.target]

    @property
    def n(self) -> int:
        return len(self.x)

    def capture_forward(self, layers: list[str], grad: bool,
                        x: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
        """Bare forward of ``x`` (default: the input) recording the outputs of
        ``layers`` (hooks removed after)."""
        modules = dict(self.model.named_modules())
        acts: list[torch.Tensor] = []
        handles = [modules[name].register_forward_hook(lambda m, i, o: acts.append(o))
                   for name in layers]
        try:
            with torch.set_grad_enabled(grad):
                logits = self.model(self.x if x is None else x)
        finally:
            for h in handles:
                h.remove()
        return logits, acts


def _import(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ---------------------------------------------------------------------- builders
def ours(s: Setup, method: str, params: dict[str, Any]) -> tuple[Fn | None, dict[str, Any]]:
    """``explain`` on the shared Explainer, with the parameters the method declares."""
    if method not in xw.methods():
        return None, params
    declared = {p.name for p in xw.get_method(method).params}
    used = {k: v for k, v in params.items() if k in declared}
    layer = s.layer if xw.get_method(method).uses_layer else None
    return (lambda: s.explainer.explain(method, target=s.targets, layer=layer, **used)), used


def gradient_cases(s: Setup) -> list[Case]:
    captum = _import("captum.attr")
    model, x, t = s.model, s.x, s.targets
    limit = lambda: forward_backward(model, x, s.target)  # noqa: E731
    doc = "1 forward + 1 backward"
    peers = {
        "gradient": lambda: captum.Saliency(model).attribute(x, target=t, abs=False),
        "guided_backprop": lambda: captum.GuidedBackprop(model).attribute(x, target=t),
        "deconvnet": lambda: captum.Deconvolution(model).attribute(x, target=t),
    }
    cases = []
    for method, peer in peers.items():
        fn, used = ours(s, method, {})
        cases.append(Case(method, used, fn, limit, doc,
                          {"captum": peer if captum else None}))
    return cases


def integrated_gradients_case(s: Setup) -> Case:
    captum = _import("captum.attr")
    cfg, model, x = s.cfg, s.model, s.x
    fn, used = ours(s, "integrated_gradients",
                    {"steps": cfg.steps, "batch_size": cfg.chunk, "baseline": 0.0})
    alphas = torch.arange(1, cfg.steps + 1, dtype=x.dtype, device=x.device) / cfg.steps
    path = (alphas[:, None, None, None, None] * x[None]).reshape(-1, *x.shape[1:])
    targets = s.target.repeat(cfg.steps)

    def limit() -> None:
        for start in range(0, len(path), cfg.chunk):
            forward_backward(model, path[start:start + cfg.chunk],
                             targets[start:start + cfg.chunk])

    peer = captum and (lambda: captum.IntegratedGradients(model).attribute(
        x, baselines=0.0, target=s.targets, n_steps=cfg.steps, method="riemann_right",
        internal_batch_size=cfg.chunk))
    doc = f"{cfg.steps}×N rows forward + backward, {cfg.chunk} rows per call"
    return Case("integrated_gradients", used, fn, limit, doc, {"captum": peer or None})


def smoothgrad_case(s: Setup) -> Case:
    captum = _import("captum.attr")
    cfg, model, x = s.cfg, s.model, s.x
    fn, used = ours(s, "smoothgrad", {"n": cfg.samples, "sigma": cfg.sigma, "seed": 0,
                                      "batch_size": cfg.chunk})
    noise = torch.randn(cfg.samples, *x.shape, device=x.device)
    noisy = (x[None] + cfg.sigma * noise).reshape(-1, *x.shape[1:])
    targets = s.target.repeat(cfg.samples)

    def limit() -> None:
        for start in range(0, len(noisy), cfg.chunk):
            forward_backward(model, noisy[start:start + cfg.chunk],
                             targets[start:start + cfg.chunk])

    stdev = cfg.sigma * float(x.max() - x.min())
    peer = captum and (lambda: captum.NoiseTunnel(captum.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=cfg.samples, stdevs=stdev, target=s.targets,
        nt_samples_batch_size=max(1, cfg.chunk // s.n), abs=False))
    doc = f"{cfg.samples}×N rows forward + backward, {cfg.chunk} rows per call"
    return Case("smoothgrad", used, fn, limit, doc, {"captum": peer or None})


def cam_cases(s: Setup) -> list[Case]:
    captum = _import("captum.attr")
    gradcam_lib = _import("pytorch_grad_cam")
    targets_lib = _import("pytorch_grad_cam.utils.model_targets")
    model, x, size = s.model, s.x, tuple(s.x.shape[-2:])

    def layer_grad() -> tuple[torch.Tensor, torch.Tensor]:
        logits, (act,) = s.capture_forward([s.layer], grad=True)
        (g,) = torch.autograd.grad(score(logits, s.target), act)
        return act, g

    def guided_limit() -> None:
        # one forward serves both: a backward to the layer, then one on to the input
        xg = x.detach().requires_grad_(True)
        logits, (act,) = s.capture_forward([s.layer], grad=True, x=xg)
        out = score(logits, s.target)
        torch.autograd.grad(out, act, retain_graph=True)
        torch.autograd.grad(out, xg)

    def captum_gradcam() -> torch.Tensor:
        cam = captum.LayerGradCam(model, s.module).attribute(x, target=s.targets)
        return captum.LayerAttribution.interpolate(cam, size, "bilinear")

    def grad_cam_lib() -> object:
        targets = [targets_lib.ClassifierOutputTarget(c) for c in s.targets]
        with gradcam_lib.GradCAM(model=model, target_layers=[s.module]) as cam:
            return cam(input_tensor=x, targets=targets)

    fn, used = ours(s, "gradcam", {})
    gradcam = Case("gradcam", used, fn, layer_grad, "1 forward + backward to the layer",
                   {"captum": captum_gradcam if captum else None,
                    "pytorch-grad-cam": grad_cam_lib if gradcam_lib else None})
    fn, used = ours(s, "guided_gradcam", {})
    guided = Case("guided_gradcam", used, fn, guided_limit,
                  "1 forward + backward to the layer + backward to the input",
                  {"captum": captum and (lambda: captum.GuidedGradCam(model, s.module)
                                         .attribute(x, target=s.targets)) or None})
    return [gradcam, guided]


def occlusion_case(s: Setup) -> Case:
    captum = _import("captum.attr")
    cfg, model, x = s.cfg, s.model, s.x
    fn, used = ours(s, "occlusion", {"window": cfg.window, "stride": cfg.stride,
                                     "value": 0.0, "batch_size": cfg.chunk})
    side = [1 + max(0, (n - cfg.window) // cfg.stride) for n in x.shape[-2:]]
    windows = side[0] * side[1]
    per_call = max(1, cfg.chunk // s.n) * s.n

    def limit() -> None:
        forwards(model, x, s.n, s.n)  # the unoccluded scores
        forwards(model, x, windows * s.n, per_call)

    peer = captum and (lambda: captum.Occlusion(model).attribute(
        x, sliding_window_shapes=(3, cfg.window, cfg.window),
        strides=(3, cfg.stride, cfg.stride), baselines=0.0, target=s.targets,
        perturbations_per_eval=max(1, cfg.chunk // s.n)))
    doc = f"(1 + {windows} windows)×N rows forward, no autograd"
    return Case("occlusion", used, fn, limit, doc, {"captum": peer or None})


def unshared_relus(model: nn.Module) -> nn.Module:
    """A copy of a torchvision ResNet computing the same function with one ReLU module per
    use: Captum's DeepLift cannot handle the ReLU each block calls two or three times."""
    import copy
    import types

    from torchvision.models.resnet import BasicBlock, Bottleneck

    def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        deep = isinstance(block, Bottleneck)
        out = block.relu_a(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
        if deep:
            out = block.bn3(block.conv3(block.relu_b(out)))
        identity = x if block.downsample is None else block.downsample(x)
        return block.relu_c(out + identity)

    twin = copy.deepcopy(model)
    for block in twin.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            block.relu_a, block.relu_b, block.relu_c = nn.ReLU(), nn.ReLU(), nn.ReLU()
            block.forward = types.MethodType(forward, block)
    return twin


def deeplift_case(s: Setup) -> Case:
    captum = _import("captum.attr")
    model, x = s.model, s.x
    fn, used = ours(s, "deeplift", {"baseline": 0.0})

    def limit() -> None:
        with torch.no_grad():
            model(torch.zeros_like(x))  # reference activations
        forward_backward(model, x, s.target)

    twin = unshared_relus(model)
    peer = captum and (lambda: captum.DeepLift(twin).attribute(x, baselines=0.0,
                                                               target=s.targets))
    return Case("deeplift", used, fn, limit, "reference forward + 1 forward + 1 backward",
                {"captum": peer or None},
                peer_note="Captum runs on a copy whose residual blocks use one ReLU module "
                "per call (same function): it rejects ReLU modules used twice")


def lrp_case(s: Setup) -> Case:
    composite = "epsilon_plus_flat"
    fn, used = ours(s, "lrp", {"composite": composite})
    model, x = s.model, s.x
    zennit_fn = zennit_lrp(model, composite)
    peer = zennit_fn and (lambda: zennit_fn(x, s.target))
    return Case("lrp", used, fn, lambda: forward_backward(model, x, s.target),
                "1 forward + 1 backward (rule evaluation not counted)",
                {"zennit": peer or None})


def zennit_lrp(model: nn.Module, composite: str) -> Callable | None:
    """LRP with zennit's own composite, canonizers and Gradient attributor, the
    backward started from the target logit (so it sums to f_c like ours)."""
    if _import("zennit") is None:
        return None
    from torchvision.models import ResNet
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    if composite != "epsilon_plus_flat":
        return None
    canonizer = ResNetCanonizer() if isinstance(model, ResNet) else SequentialMergeBatchNorm()

    def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def start(out: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(out).scatter_(1, target[:, None],
                                                  out.gather(1, target[:, None]))

        with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[canonizer])) as attr:
            _, relevance = attr(x, start)
        return relevance

    return run


def lime_case(s: Setup) -> Case:
    captum = _import("captum.attr")
    cfg, model, x = s.cfg, s.model, s.x
    fn, used = ours(s, "lime", {"n_samples": cfg.lime_samples,
                                "n_segments": cfg.lime_segments, "seed": 0,
                                "batch_size": cfg.chunk})

    def limit() -> None:
        forwards(model, x, cfg.lime_samples * s.n, cfg.chunk)

    def peer() -> torch.Tensor:
        from captum._utils.models.linear_model import SkLearnRidge
        from captum.attr._core.lime import get_exp_kernel_similarity_function
        from skimage.segmentation import slic

        image = x.permute(0, 2, 3, 1).cpu().double().numpy()
        masks = torch.stack([torch.from_numpy(slic(im, n_segments=cfg.lime_segments,
                                                   start_label=0)) for im in image])
        lime = captum.Lime(model, interpretable_model=SkLearnRidge(alpha=1.0),
                           similarity_func=get_exp_kernel_similarity_function("cosine", 0.25))
        with torch.no_grad():  # its sklearn fit takes the model outputs as numpy
            return lime.attribute(x, target=s.targets, baselines=0.0,
                                  feature_mask=masks[:, None].to(x.device),
                                  n_samples=cfg.lime_samples,
                                  perturbations_per_eval=cfg.chunk)

    ok = captum is not None and _import("sklearn") is not None
    doc = f"{cfg.lime_samples}×N rows forward, no autograd (SLIC and the fit not counted)"
    return Case("lime", used, fn, limit, doc, {"captum": peer if ok else None})


def meaningful_perturbation_case(s: Setup) -> Case:
    cfg, model, x = s.cfg, s.model, s.x
    fn, used = ours(s, "meaningful_perturbation", {"steps": cfg.mp_steps, "seed": 0})

    def limit() -> None:
        for _ in range(cfg.mp_steps):
            forward_backward(model, x, s.target)

    return Case("meaningful_perturbation", used, fn, limit,
                f"{cfg.mp_steps} × (1 forward + 1 backward)", {})


def fem_cases(s: Setup) -> list[Case]:
    gradcam_lib = _import("pytorch_grad_cam")
    model, x = s.model, s.x
    blocks = s.explainer.block_layers()
    modules = dict(model.named_modules())

    def grad_cam_fem(layers: list[str]) -> Fn | None:
        if gradcam_lib is None or not hasattr(gradcam_lib, "FEM"):
            return None

        def run() -> object:
            # its FEM needs no gradient: no_grad is how a careful user calls it
            with torch.no_grad(), gradcam_lib.FEM(model, [modules[n] for n in layers],
                                                  k=1.0) as cam:
                return cam(input_tensor=x, targets=None)

        return run

    fn, used = ours(s, "fem", {"K": 1.0})
    fem = Case("fem", used, fn, lambda: s.capture_forward([s.layer], grad=False),
               "1 forward, no autograd", {"pytorch-grad-cam": grad_cam_fem([s.layer])},
               cold_cache=True, peer_note="pytorch-grad-cam FEM weights channels by the "
               "fraction of pixels that fire, ours by their mean")
    fn, used = ours(s, "mlfem", {"K": 1.0, "operator": "max"})
    mlfem = Case("mlfem", used, fn, lambda: s.capture_forward(blocks, grad=False),
                 f"1 forward recording {len(blocks)} blocks, no autograd",
                 {"pytorch-grad-cam": grad_cam_fem(blocks)}, cold_cache=True,
                 peer_note="pytorch-grad-cam FEM on every block, maps averaged")
    return [fem, mlfem]


BUILDERS: list[Callable[[Setup], Case | list[Case]]] = [
    gradient_cases, integrated_gradients_case, smoothgrad_case, cam_cases, deeplift_case,
    lrp_case, occlusion_case, lime_case, meaningful_perturbation_case, fem_cases,
]


def build_cases(s: Setup, methods: list[str] | None = None) -> list[Case]:
    """Every case, in teaching order, keeping only ``methods`` when given."""
    cases: list[Case] = []
    for builder in BUILDERS:
        built = builder(s)
        cases.extend(built if isinstance(built, list) else [built])
    if methods:
        unknown = set(methods) - {c.method for c in cases}
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: "
                             f"{[c.method for c in cases]}")
        cases = [c for c in cases if c.method in methods]
    return cases


# ------------------------------------------------------------------ model and input
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_model(name: str, device: torch.device, seed: int = 0) -> nn.Module:
    """A torchvision classifier, randomly initialised (``weights=None``: no download)."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).eval().to(device)


def make_setup(model: nn.Module, batch: int, size: int, device: torch.device, cfg: Config,
               seed: int = 0) -> Setup:
    """Random display images, ImageNet-normalised, and random explicit targets."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    x = ((images - mean) / std).to(device)
    explainer = xw.Explainer(model, x, progress=False)
    target = torch.randint(explainer.num_classes, (batch,), generator=generator).to(device)
    return Setup(model, x, target, explainer, cfg)
