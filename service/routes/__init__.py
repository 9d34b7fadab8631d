"""The gateway's HTTP routes, one module per resource (all under /v1 but the health checks)."""
