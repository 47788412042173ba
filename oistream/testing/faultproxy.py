"""The old name of :mod:`oistream.testing.proxy`, kept so that ``FaultProxy`` imports work.

The fault proxy and the benchmarks' counting proxy are now one class, ``Proxy``, with one stats
type, ``ProxyStats``; see that module.
"""

from oistream.testing.proxy import FAULTS, ProxyStats
from oistream.testing.proxy import Proxy as FaultProxy

__all__ = ["FAULTS", "FaultProxy", "ProxyStats"]
