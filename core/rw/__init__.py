"""The random-walk stage (``scripts/rw``): affinity labels, AffinityNet training pieces and the random walk will
live here.

It reads CAM and saliency folders through :mod:`core.artifacts` and decodes them with :mod:`core.labels`.
"""
