"""Meaningful perturbation: blur and total variation against independent computations,
localisation on a model that looks only at the top-left quadrant, determinism."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

import xaiwidgets as xw
from xaiwidgets.families.meaningful_perturbation import gaussian_blur, total_variation

from .helpers import TopLeftTexture, noise_images


def test_blur_matches_scipy():
    x = noise_images(1, 24)
    ours = gaussian_blur(x, 2.0)[0].numpy()
    # scipy's "nearest" mode replicates edges; truncate=3 gives the same 6-pixel radius
    theirs = np.stack([gaussian_filter(c, 2.0, mode="nearest", truncate=3.0)
                       for c in x[0].numpy()])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_total_variation_by_hand():
    m = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]).reshape(1, 1, 2, 3)
    # vertical |Δ|³: (0, 0.125, 1) -> mean 0.375; horizontal: (0.125, 0.125, 0, 0) -> 0.0625
    np.testing.assert_allclose(total_variation(m, 3.0).numpy(), [0.4375])


def test_deletion_mask_covers_the_top_left_quadrant():
    ex = xw.Explainer(TopLeftTexture(), noise_images(2, 64), progress=False)
    r = ex.explain("meaningful_perturbation", target=0, steps=100, l1=0.05).values
    assert r.min() >= 0 and r.max() <= 1
    quadrants = [r[:, :32, :32], r[:, :32, 32:], r[:, 32:, :32], r[:, 32:, 32:]]
    means = np.stack([q.mean(axis=(1, 2)) for q in quadrants])
    assert (means[0] > 0.9).all()  # the evidence is deleted
    assert (means[0] > 2 * means[1:]).all()
    # the perturbed image no longer shows the class
    with torch.no_grad():
        keep = 1 - torch.from_numpy(r)[:, None]
        x = ex.inputs
        perturbed = x * keep + gaussian_blur(x, 10.0) * (1 - keep)
        assert (torch.softmax(ex.model(perturbed), 1)[:, 0] < 0.5).all()


def test_deterministic_given_the_seed_and_all_images_at_once():
    x = noise_images(2, 32)
    ex = xw.Explainer(TopLeftTexture(), x, progress=False)
    a = ex.explain("meaningful_perturbation", target=0, steps=15, seed=1).values
    b = ex.explain("meaningful_perturbation", target=0, steps=15, seed=1).values
    c = ex.explain("meaningful_perturbation", target=0, steps=15, seed=2).values
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (2, 32, 32)


def test_progress_is_reported_per_step():
    calls = []
    ex = xw.Explainer(TopLeftTexture(), noise_images(1, 16),
                      progress=lambda done, total: calls.append((done, total)))
    ex.explain("meaningful_perturbation", target=0, steps=7)
    assert calls[-1] == (7, 7) and len(calls) == 7


def paper_loop(model, x, target, steps, l1=0.01, tv=0.2, sigma=10.0, seed=0):
    """Fong & Vedaldi's optimisation written out directly: Adam on
    l1·mean|1 − m| + tv·TV(m) + softmax_c, autograd through the probability itself."""
    from xaiwidgets.core.ops import image_generators, image_span, per_image_randn, upsample

    n, _, h, w = x.shape
    blurred = gaussian_blur(x, sigma)
    mask = torch.ones((n, 1, h // 8, w // 8), dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([mask], lr=0.1)
    generators, span = image_generators(x, seed), image_span(x)
    for _ in range(steps):
        keep = upsample(mask, (h, w))
        perturbed = x * keep + blurred * (1 - keep) + 0.05 * span * per_image_randn(generators, x)
        p = torch.softmax(model(perturbed), 1).gather(1, target[:, None])[:, 0]
        loss = l1 * (1 - mask).abs().flatten(1).mean(1) + tv * total_variation(mask) + p
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            mask.clamp_(0.0, 1.0)
    return 1 - upsample(mask.detach(), (h, w))[:, 0]


def conv_net(seed: int = 0, logit_scale: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(32, 5)).eval()
    with torch.no_grad():
        net[-1].weight.mul_(logit_scale)
        net[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, -logit_scale]))
    return net


def test_the_map_is_the_papers_optimisation():
    # an independent loop that backpropagates p itself (float64, so the improbable
    # class stays far from underflow) gives the same map as ours (p·∂ log p)
    x = noise_images(2, 32).double()
    target = torch.tensor([1, 4])
    for scale in (1.0, 30.0):  # moderate, and a class with p ≈ e^-30
        model = conv_net(logit_scale=scale).double()
        ours = xw.Explainer(model, x, progress=False).explain(
            "meaningful_perturbation", target=target.tolist(), steps=6).values
        expected = paper_loop(model, x, target, steps=6).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)


def test_an_improbable_class_gets_the_gradient_of_its_probability():
    from xaiwidgets.families.meaningful_perturbation import score_gradient

    model = conv_net(logit_scale=300.0)  # class 4: p far below float32's smallest normal
    x = noise_images(2, 16)
    mask = torch.full((2, 1, 2, 2), 0.7, requires_grad=True)
    perturbed = x * torch.nn.functional.interpolate(mask, size=(16, 16))
    ctx = xw.Explainer(model, x).context
    ours = score_gradient(ctx.log_probabilities(model(perturbed)).gather(
        1, torch.tensor([[4], [4]]))[:, 0], mask)
    # the reference: p's own gradient, in float64 where p does not underflow
    m64 = mask.detach().double().requires_grad_()
    p = torch.softmax(model.double()(x.double() * torch.nn.functional.interpolate(
        m64, size=(16, 16))), 1)[:, 4]
    (expected,) = torch.autograd.grad(p.sum(), m64)
    assert 0 < p.max() < 1e-38  # the float32 gradient of p would be denormal or zero
    np.testing.assert_allclose(ours.double().numpy(), expected.numpy(), rtol=1e-4,
                               atol=1e-45)
