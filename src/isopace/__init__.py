"""isopace: ISO 8583 card payment transaction processing.

Layers, lowest first: ``iso8583`` (message and codec), ``flow`` (the two-phase transaction
manager), ``store`` (durable journals, idempotency stores, recovery), ``net`` (TCP framing,
server, client) and ``host`` / ``cli`` (the reference authorization host and the command line).
"""

from isopace.errors import IsopaceError

__all__ = ["IsopaceError", "__version__"]
__version__ = "0.1.0"
