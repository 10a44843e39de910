"""Telemetry: metrics, trace context propagation, access logs."""
