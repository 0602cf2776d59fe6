"""The core both data planes share: settings, the immutable snapshot and its route model, the
balancers and their live state, metrics, listening sockets and TLS material.

It imports ``discovery`` and nothing else of the project: ``l4`` and ``l7`` build on it, and the
process layer (the rest of ``meshproxy``) wires them together. The layering is checked by
``make lint`` (``.importlinter``) and by tests/test_layers.py.

Nothing is imported here on purpose: ``meshproxy.core.settings`` must stay importable before
prometheus_client is (``--workers`` sets up multiprocess metrics first, ``meshproxy.multiproc``).
"""
