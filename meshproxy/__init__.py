"""meshproxy: a load-balancing service mesh and ingress proxy configured with Kubernetes manifests.

Packages: ``discovery`` (objects, selectors, endpoints, health, sources), ``meshproxy`` (process,
CLI, snapshot, balancers, admin, metrics), ``l4`` (TCP balancer), ``l7`` (HTTP router).
"""

__version__ = "0.1.0"
