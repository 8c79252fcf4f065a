"""PoolNet saliency refinement (stage 2 of P-NOC): a salient-object network trained on C²AM-H saliency PNGs.

A small package over ``core`` (backbones, datasets, engine, runtime, artifacts, manifests); nothing in ``core`` or
``scripts`` imports it. Entry points: ``poolnet/train.py``, ``poolnet/test.py`` and ``poolnet/main_voc.py`` (the
reference's command line). See ``poolnet/README.md``.
"""
