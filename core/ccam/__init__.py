"""The saliency stage (``scripts/ccam``): C²AM / C²AM-H training and inference pieces will live here.

Its network registers in :mod:`core.models`; it reads CAM folders through :mod:`core.artifacts`, never through
:mod:`core.cam`.
"""
