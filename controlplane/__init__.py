"""Control plane: resources -> per-proxy config, push server, CA, the controller app."""
