"""Benchmark suite: the gateway beside direct, a plain aiohttp proxy, nginx and HAProxy.

Run it with `python -m bench` (or `python -m bench --quick`); see bench/README.md.
"""
