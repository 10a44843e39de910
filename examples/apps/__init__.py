"""The shop: frontend -> catalog (v1/v2 canary), ratings, payments (gRPC)."""
