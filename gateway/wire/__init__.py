"""The protocol, ``gateway.v1``: codes, errors, the typed events a generation produces,
inbound messages and outbound frames. The only code that builds or parses protocol JSON.

Nothing in this package does I/O or imports from the rest of the gateway.
"""

PROTOCOL = "gateway.v1"
# A browser cannot set headers on a WebSocket handshake: it may offer its token as the
# subprotocol ``bearer.<jwt>`` beside ``PROTOCOL``.
BEARER_SUBPROTOCOL_PREFIX = "bearer."
