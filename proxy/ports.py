"""Well-known ports and identities of the proxy (data only: the webhook imports this)."""

from __future__ import annotations

OUTBOUND_CAPTURE_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
STATUS_PORT = 15020
ADMIN_PORT = 15000

WEBHOOK_PORT = 9443
CONTROLLER_API_PORT = 15012
CONTROLLER_METRICS_PORT = 15014

PROXY_UID = 1337
PROXY_GID = 1337

PROXY_CONTAINER_NAME = "synchro-proxy"
INIT_CONTAINER_NAME = "synchro-init"

# Ports whose protocol speaks first from the server side: waiting for the client's
# first bytes to detect a protocol would stall them, so detection is skipped.
SERVER_FIRST_PORTS = frozenset({25, 587, 3306, 5432, 6379, 11211})

# Ports the proxy itself listens on; never redirected back into the proxy.
PROXY_OWN_PORTS = frozenset({OUTBOUND_CAPTURE_PORT, INBOUND_CAPTURE_PORT, STATUS_PORT, ADMIN_PORT})
