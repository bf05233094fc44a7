"""`fastdl bench`: every op against torch on the GPU, kept as data (<op>.json), drawn from it.

core.py holds the method (timing, providers, ceilings, JSON, plot, summary); each op's cases live
in a module of its own stem that registers an OpSpec.
"""
from fastdl.bench.core import *  # noqa: F401,F403
from fastdl.bench import cross_entropy, linear  # noqa: E402,F401  (register their OpSpecs)
