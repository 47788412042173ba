"""pandas, imported when first used, and by a shard run on a thread while its first requests
are in flight.

``import pandas`` costs ~0.13 s of CPU, and a shard run's first use of it comes only once the
CSV's rows arrive: imported with the catalog, it held back the first request of the 1%
benchmark run by that much. ``pd`` stands in for the module (``pd.concat`` imports pandas on
the spot if the thread has not yet), so the modules that use it keep writing ``pd.X``.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any


class _Pandas:
    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("pandas"), name)


pd: Any = _Pandas()


def import_in_background(*modules: str) -> None:
    """Start importing ``modules``, in their order, on a thread of its own; whoever imports one
    of them (or uses ``pd``, when pandas is among them) first waits for it."""

    def import_each() -> None:
        for module in modules:
            importlib.import_module(module)

    threading.Thread(target=import_each, name="import-in-background", daemon=True).start()
