"""secagg: secure aggregation for federated learning, as a sans-I/O protocol core.

The protocol is Bonawitz et al. 2017 (eprint 2017/281) with the SecAgg+ sparse
neighbour graph; peers sum their masked inputs among themselves along an
accumulation tree. Nothing in this package performs I/O: the drivers in
``peers`` and ``server`` (or the in-memory simulator ``secagg.sim``) feed
events in and carry the resulting actions out.
"""

__version__ = "0.1.0"
