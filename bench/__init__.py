"""Benchmarks and load tools for meshproxy (see docs/benchmarks.md).

``python -m bench`` — meshproxy side by side with nginx, HAProxy, Envoy, aiohttp and proxy.py;
``python -m bench.load`` — the HTTP load generator; ``python -m bench.scale`` — control-plane
scale; ``bench.tcpserver`` / ``bench.tcpload`` — L4 backend and clients.
"""
