"""Vision transformers: Grad-CAM against pytorch-grad-cam, attention rollout against one
forward pass. Same run, same model, input, targets and layer for every contender.

```bash
python -m benchmarks.transformers                      # ViT-B/16 and Swin-T, 224², batch 2, CPU
python -m benchmarks.transformers --repeats 5 --out benchmarks/results/transformers_cpu.json
```

Contenders (timm models, random weights, eval mode, fused attention on):

* **gradcam**: ours (``ex.explain("gradcam", target=...)`` at our default layer: ViT's
  last block's ``norm1``, Swin's last block) and pytorch-grad-cam's ``GradCAM`` at the
  same layer with the ``reshape_transform`` its documentation gives for that layout
  (drop the class token and reshape (N, L, D) for ViT; permute (N, h, w, C) for Swin);
  the limit is one forward with autograd + a backward to the layer;
* **attention_rollout** (ViT only; Swin's windowed attention is refused): ours against
  one forward pass without autograd (the target is ≤ 1.2×).

Medians of interleaved rounds (``benchmarks.timing.interleaved``).
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch

import xaiwidgets as xw

from .timing import CLOCKS, interleaved, median, use_clock

MODELS = {"vit_b16": "vit_base_patch16_224", "swin_t": "swin_tiny_patch4_window7_224"}


def vit_reshape(tensor: torch.Tensor, height: int = 14, width: int = 14) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT ``reshape_transform`` (class token dropped)."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(tensor: torch.Tensor) -> torch.Tensor:
    """Channels-last (N, h, w, C) to (N, C, h, w) for pytorch-grad-cam."""
    return tensor.permute(0, 3, 1, 2)


def contenders(key: str, batch: int, size: int) -> dict[str, dict[str, Any]]:
    """Per method: ``{contender: fn}`` and the layer used."""
    import timm
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = timm.create_model(MODELS[key], pretrained=False).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=generator)
    ex = xw.Explainer(model, x, progress=False)
    targets = torch.randint(ex.num_classes, (batch,), generator=generator).tolist()
    layer = ex.default_layer()
    module = model.get_submodule(layer)
    reshape = vit_reshape if key == "vit_b16" else swin_reshape

    def theirs() -> object:
        with GradCAM(model=model, target_layers=[module], reshape_transform=reshape) as cam:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])

    def limit() -> None:
        kept: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: kept.append(out))
        try:
            logits = model(x)
        finally:
            handle.remove()
        torch.autograd.grad(logits.gather(1, torch.tensor(targets)[:, None]).sum(), kept[-1])

    def forward() -> None:
        with torch.no_grad():
            model(x)

    cases = {"gradcam": {"layer": layer, "fns": {
        "ours": lambda: ex.explain("gradcam", target=targets),
        "pytorch-grad-cam": theirs, "limit": limit}}}
    if key == "vit_b16":
        cases["attention_rollout"] = {"layer": "", "fns": {
            "ours": lambda: ex.explain("attention_rollout"), "one forward": forward}}
    return cases


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU seconds (steadier on a shared machine)")
    args = parser.parse_args(argv)
    use_clock(args.clock)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows = []
    for key in args.models.split(","):
        for method, case in contenders(key, args.batch, args.size).items():
            samples = interleaved(case["fns"], device, args.repeats)
            times = {name: median(s) for name, s in samples.items()}
            reference = times.get("pytorch-grad-cam") or times.get("one forward")
            ratio = times["ours"] / reference if times["ours"] and reference else None
            rows.append({"model": MODELS[key], "method": method, "layer": case["layer"],
                         "median_s": times, "ratio": ratio, "samples": samples})
            shown = ", ".join(f"{k} {v:.3f} s" for k, v in times.items() if v)
            print(f"{MODELS[key]:30s} {method:18s} {shown}  ours/reference "
                  f"{ratio:.2f}x" if ratio else f"{MODELS[key]} {method}: {samples}")
    result = {"batch": args.batch, "size": args.size, "repeats": args.repeats,
              "clock": args.clock,
              "threads": torch.get_num_threads(), "machine": platform.processor() or
              platform.machine(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
