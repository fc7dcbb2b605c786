"""Synthetic VQA where token selection matters: small coloured objects on a cluttered background.

``scenes``: deterministic scene sampling and rendering (torch, CPU or GPU); ``questions``:
templated one-word questions; ``model``: the tiny LLaVA of the real classes; ``train``: the
reproducible training command; ``splits``: fixed validation/test sets and the parquet export.
"""
