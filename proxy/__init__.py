"""synchro-proxy: the sidecar, its init container, and the proxy's config schema."""
