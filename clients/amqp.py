"""pika for the CLI, without the adapter it never uses.

`import pika` runs pika/adapters/__init__.py, which imports the asyncio adapter and with
it asyncio: about 20 ms of a `molteniron allocate` that lasts under 200. The CLI uses
only the blocking adapter, so while pika is imported a placeholder stands in for the
asyncio one; afterwards an explicit `import pika.adapters.asyncio_connection` still
gets the real module (only `pika.adapters.AsyncioConnection` stays None).
"""

from __future__ import annotations

import sys
import types

_ASYNCIO_ADAPTER = "pika.adapters.asyncio_connection"

if "pika" not in sys.modules and _ASYNCIO_ADAPTER not in sys.modules:
    _placeholder = types.ModuleType(_ASYNCIO_ADAPTER)
    _placeholder.AsyncioConnection = None
    sys.modules[_ASYNCIO_ADAPTER] = _placeholder
    try:
        import pika
    finally:
        if sys.modules.get(_ASYNCIO_ADAPTER) is _placeholder:
            del sys.modules[_ASYNCIO_ADAPTER]
else:
    import pika

__all__ = ["pika"]
