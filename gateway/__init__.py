"""failover-gateway: a health- and latency-aware failover reverse proxy for inference endpoints."""

__version__ = "0.1.0"
