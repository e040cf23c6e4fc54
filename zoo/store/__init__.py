"""Getting files safely from somewhere to here: the cache, hubs, the release store, bundles, and the
gate that every zip passes before concrete reads it.

A light wing: it imports neither torch nor concrete (``tests/test_layout.py``).
"""
