"""Benchmarks: xaiwidgets against Captum, Zennit, pytorch-grad-cam and bare torch.

Run ``python -m benchmarks.run --help``; see ``benchmarks/README.md``.
"""
