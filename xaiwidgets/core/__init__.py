"""The core layer: tensor ops, input validation, the method registry, layer discovery,
scoped changes to models, and the typed context a method receives.

Nothing here imports from the rest of the package, so every other layer
(families → fusion → evaluation → widgets) can build on it.
"""
