"""Shared library of the WSSS toolkit: datasets, stage files, models, losses, training engine, evaluation.

Importing ``core`` has no side effects: no file reads, no global torch flags, no logging set-up.
"""
