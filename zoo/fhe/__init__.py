"""Running a build: the clear head, keys, encryption, simulation and real FHE, here or on a
``zoo serve`` server, and the evaluations that measure it. Needs concrete (and torch for the head).
"""
