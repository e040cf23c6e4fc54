"""The catalogue: ``registry.json`` as typed records, manifests, model cards, runtime versions.

A light wing: it imports neither torch nor concrete (``tests/test_layout.py``), so ``zoo list``,
``zoo info`` and ``zoo pull`` start in a fraction of a second.
"""
