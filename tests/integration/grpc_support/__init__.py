"""Test support for the HTTP/2 proxy: a raw-bytes gRPC service, a tiny h2 upstream,
an in-process proxy around `proxy.http2.serve`, and a small blocking h2 client."""
