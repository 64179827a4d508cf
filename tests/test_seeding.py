"""Seeded methods are reproducible per image (#13 item 5): an image gets the same map
alone as in a batch of 4, whatever the chunking, because each image's generator is
seeded by (seed, the image's content)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xaiwidgets as xw
from xaiwidgets.core.ops import image_seeds

CASES = {
    "smoothgrad": [{"n": 6, "batch_size": 5}, {"n": 6, "batch_size": 24}],
    "lime": [{"n_samples": 24, "n_segments": 8, "batch_size": 7},
             {"n_samples": 24, "n_segments": 8, "batch_size": 64}],
    "meaningful_perturbation": [{"steps": 6, "tv": 0.0, "l1": 0.0}],
}


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", sorted(CASES))
def test_same_map_alone_and_in_a_batch(method, tiny_cnn, batch):
    # the predicted classes: deleting their evidence lowers the score (MP's mask moves)
    target = tiny_cnn(batch).argmax(1).tolist()
    maps = [xw.Explainer(tiny_cnn, batch).explain(method, target=target, seed=0, **params)
            for params in CASES[method]]
    for together in maps:
        for i in (0, 2):
            alone = xw.Explainer(tiny_cnn, batch[i:i + 1]).explain(
                method, target=target[i], seed=0, **CASES[method][0])
            np.testing.assert_allclose(alone.values[0], together.values[i],
                                       rtol=1e-4, atol=1e-5)
    assert np.abs(maps[0].values).max() > 0
    # the seed still matters
    other = xw.Explainer(tiny_cnn, batch[:1]).explain(method, target=target[0], seed=1,
                                                      **CASES[method][0])
    assert not np.allclose(other.values[0], maps[0].values[0])


def test_the_same_image_twice_in_a_batch_gets_the_same_map(tiny_cnn, batch):
    twice = torch.stack([batch[0], batch[0]])
    result = xw.Explainer(tiny_cnn, twice).explain("smoothgrad", target=1, n=4)
    np.testing.assert_array_equal(result.values[0], result.values[1])


def test_image_seeds_depend_on_seed_and_content_only(batch):
    seeds = image_seeds(batch, 7)
    assert len(set(seeds)) == 4
    assert image_seeds(batch[2:3], 7) == seeds[2:3]
    assert image_seeds(batch.clone(), 7) == seeds
    assert image_seeds(batch, 8) != seeds
    changed = batch.clone()
    changed[1, 0, 0, 0] += 1e-3
    assert image_seeds(changed, 7)[1] != seeds[1] and image_seeds(changed, 7)[0] == seeds[0]
