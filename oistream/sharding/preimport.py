"""Modules imported on a thread while a shard run's first requests are in flight.

The CSV's modules (catalog and plan, with numpy: 0.1-0.2 s of CPU) are needed only once the
CSV's rows arrive; imported before the class lists are read, they held back the first request
by that much.
"""

from __future__ import annotations

import importlib
import threading


def import_in_background(*modules: str) -> None:
    """Start importing ``modules``, in their order, on a thread of its own; whoever imports one
    of them first waits for it (the import lock)."""

    def import_each() -> None:
        for module in modules:
            importlib.import_module(module)

    threading.Thread(target=import_each, name="import-in-background", daemon=True).start()
