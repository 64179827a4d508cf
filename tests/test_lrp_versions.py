"""LRP gives the same maps under zennit 0.5.1 and 1.0.0.

``.ci/run`` installs the other zennit version (pure-Python wheel) into
``.venv/zennit1`` (or ``$XAIWIDGETS_OTHER_ZENNIT``) and runs the LRP and safety tests
a second time with it first on ``PYTHONPATH``. This test computes maps for every
composite in this process and in a subprocess that imports the other version, and
compares them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
OTHER = Path(os.environ.get("XAIWIDGETS_OTHER_ZENNIT", ROOT / ".venv" / "zennit1"))

SCRIPT = """
import json, sys, torch, zennit
from importlib.metadata import version
import xaiwidgets as xw
from tests.helpers import ZOO, randomise_batchnorms

maps = {"zennit": version("zennit")}
from torchvision.models.resnet import BasicBlock, ResNet
ZOO["resnet (one block per stage)"] = (lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5), 32)
for name in ("resnet (one block per stage)", "densenet (121's blocks, narrow)",
             "hand/batchnorm_out_of_order", "hand/residual_add"):
    build, size = ZOO[name]
    torch.manual_seed(0)
    model = randomise_batchnorms(build().eval())
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    for composite in ("epsilon_plus_flat", "epsilon_plus", "epsilon_gamma_box", "alpha_beta",
                      "epsilon", "zero"):
        r = xw.explain(model, x, "lrp", composite=composite, target=[1, 2], reduce=None)
        maps[f"{name}/{composite}"] = r.values.tolist()
json.dump(maps, sys.stdout)
"""


def maps_with(pythonpath: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_expected_zennit_version_is_imported():
    # the second run of .ci/run sets XAIWIDGETS_EXPECT_ZENNIT=1.0.0
    expected = os.environ.get("XAIWIDGETS_EXPECT_ZENNIT")
    assert version("zennit") == (expected or version("zennit"))
    assert version("zennit") in ("0.5.1", "1.0.0")


@pytest.mark.slow
def test_maps_agree_between_zennit_versions():
    assert (OTHER / "zennit").is_dir(), (
        f"the other zennit version is not installed at {OTHER}: run .ci/run, or "
        "pip download --no-deps --only-binary=:all: --python-version 3.12 zennit==1.0.0 -d D "
        f"&& pip install --no-deps --ignore-requires-python --target {OTHER} D/zennit-*.whl")
    here = os.environ.get("PYTHONPATH")
    ours = maps_with(here)
    # run with the other version: if this process already has it first, the site one
    other_path = None if here and str(OTHER) in here else str(OTHER)
    theirs = maps_with(other_path)
    assert {ours.pop("zennit"), theirs.pop("zennit")} == {"0.5.1", "1.0.0"}
    assert ours.keys() == theirs.keys()
    worst = {}
    for key in ours:
        a, b = np.asarray(ours[key]), np.asarray(theirs[key])
        assert np.abs(a).max() > 0, key
        worst[key] = float(np.abs(a - b).max() / np.abs(a).max())
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=key)
    print("relative max difference between zennit versions:", max(worst.values()))
