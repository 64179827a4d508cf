"""The evaluation layer: gaze fixation density maps, saliency metrics, perturbation
metrics, sanity checks and dataset-scale evaluation on dask.

It builds on the engine (the Explainer, the method families and fusion) and never
imports the widgets.
"""
