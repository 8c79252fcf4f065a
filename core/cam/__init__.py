"""The CAM stage (``scripts/cam``): CAM-generator training pieces, the methods (vanilla, Puzzle-CAM, OC-CSE, P-OC,
P-NOC; Mixup-CAM, FMix-CAM, Manifold-Mixup-CAM), multi-scale CAM inference, validation and pseudo masks.

Stage packages meet only through files: nothing here is imported by another stage package or by a shared module.
"""
