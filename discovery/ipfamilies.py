"""IP families of Services: single stack, dual stack, and what the API server checks.

A Service has ``spec.ipFamilyPolicy`` (SingleStack, PreferDualStack, RequireDualStack),
``spec.ipFamilies`` (IPv4 / IPv6, primary first) and ``spec.clusterIPs`` (one per family, the
first equal to ``spec.clusterIP``). The cluster has one or two service ranges
(``--service-cidr V4[,V6]``); the first one's family is the cluster's primary family.

Rules (the API server's, ``pkg/apis/core/validation`` and the service REST allocator):

- at most two families and two ClusterIPs, never two of the same family; ClusterIP ``i`` is of
  family ``i`` when both are given; ``clusterIPs[0]`` equals ``clusterIP``; a headless service
  has ``clusterIPs: [None]``;
- SingleStack takes one family; RequireDualStack needs two (the cluster must have both
  ranges); PreferDualStack takes two when the cluster has both ranges, else one;
- without ``ipFamilies`` the families come from the given ClusterIPs, else the cluster's
  primary family first.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import ipaddress

__all__ = ["IPV4", "IPV6", "POLICIES", "family_of", "parse_cidrs", "check_service", "wanted_families",
           "cluster_families"]

IPV4, IPV6 = "IPv4", "IPv6"
POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def family_of(ip: str) -> str:
    """``IPv4`` or ``IPv6``; raises ValueError when ``ip`` is not an address."""
    return IPV6 if ipaddress.ip_address(ip).version == 6 else IPV4


def parse_cidrs(text: str) -> tuple[Network, ...]:
    """``--service-cidr``: one range, or two of different families separated by a comma.
    Raises ValueError naming the problem."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--service-cidr: no range given")
    if len(parts) > 2:
        raise ValueError(f"--service-cidr {text}: at most two ranges (one IPv4, one IPv6)")
    nets = tuple(ipaddress.ip_network(p, strict=False) for p in parts)
    if len(nets) == 2 and nets[0].version == nets[1].version:
        raise ValueError(f"--service-cidr {text}: two ranges must be of different families")
    return nets


def _family_of_net(net: Network) -> str:
    return IPV6 if net.version == 6 else IPV4


def check_service(cluster_ip: str | None, cluster_ips: list, families: list, policy: str | None
                  ) -> list[tuple[str, str]]:
    """What the API server refuses in these fields, as ``(field path, message)`` pairs.
    ``cluster_ip`` / ``cluster_ips`` / ``families`` are the raw values of the manifest."""
    errors: list[tuple[str, str]] = []
    if policy is not None and policy not in POLICIES:
        errors.append(("spec.ipFamilyPolicy", f"{policy!r} must be one of {', '.join(POLICIES)}"))
    seen: dict[str, int] = {}
    for i, fam in enumerate(families):
        if fam not in (IPV4, IPV6):
            errors.append((f"spec.ipFamilies[{i}]", f"{fam!r} must be IPv4 or IPv6"))
        elif fam in seen:
            errors.append((f"spec.ipFamilies[{i}]", f"duplicate family {fam} (also spec.ipFamilies[{seen[fam]}])"))
        else:
            seen[fam] = i
    if len(families) > 2:
        errors.append(("spec.ipFamilies", "at most two families"))
    if len(cluster_ips) > 2:
        errors.append(("spec.clusterIPs", "at most two addresses"))
    if cluster_ips and cluster_ip not in (None, "") and cluster_ips[0] != cluster_ip:
        errors.append(("spec.clusterIPs[0]", f"{cluster_ips[0]!r} must equal spec.clusterIP {cluster_ip!r}"))
    if "None" in cluster_ips and len(cluster_ips) != 1:
        errors.append(("spec.clusterIPs", "a headless service has exactly one entry, 'None'"))
    ip_families: list[str | None] = []
    for i, ip in enumerate(cluster_ips):
        if ip == "None":
            ip_families.append(None)
            continue
        try:
            ip_families.append(family_of(ip))
        except ValueError:
            errors.append((f"spec.clusterIPs[{i}]", f"{ip!r} is not an IP address"))
            ip_families.append(None)
    if len(ip_families) == 2 and ip_families[0] is not None and ip_families[0] == ip_families[1]:
        errors.append(("spec.clusterIPs[1]", f"must be of the other family than spec.clusterIPs[0] ({ip_families[0]})"))
    for i, (fam, ipfam) in enumerate(zip(families, ip_families)):
        if ipfam is not None and fam in (IPV4, IPV6) and fam != ipfam:
            errors.append((f"spec.clusterIPs[{i}]", f"{cluster_ips[i]} is {ipfam} but spec.ipFamilies[{i}] is {fam}"))
    if (policy or "SingleStack") == "SingleStack":
        if len(families) > 1:
            errors.append(("spec.ipFamilies", "SingleStack takes one family"))
        if len([f for f in ip_families if f is not None]) > 1:
            errors.append(("spec.clusterIPs", "SingleStack takes one address"))
    return errors


def wanted_families(given_ips: tuple[str, ...], families: tuple[str, ...], policy: str | None,
                    cluster: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """The families a Service gets on a cluster whose service ranges are of ``cluster``
    families (primary first), and a problem when the policy cannot be met.

    ``given_ips`` are its explicit ClusterIPs (headless excluded)."""
    policy = policy or "SingleStack"
    order = list(families) or [family_of(ip) for ip in given_ips]
    if not order:
        order = [cluster[0]] if cluster else [IPV4]
    if policy != "SingleStack" and len(order) == 1:
        other = IPV6 if order[0] == IPV4 else IPV4
        if other in cluster:
            order.append(other)
    if policy == "SingleStack":
        order = order[:1]
    missing = [f for f in order if f not in cluster and not any(family_of(ip) == f for ip in given_ips)]
    problem = None
    if policy == "RequireDualStack" and (len(order) < 2 or missing):
        problem = (f"spec.ipFamilyPolicy: RequireDualStack needs an IPv4 and an IPv6 service range "
                   f"(--service-cidr V4,V6); served as {order[0]} only" if order else "")
        order = [f for f in order if f not in missing][:1]
    elif missing:
        if policy == "PreferDualStack" and len(order) > len(missing):
            order = [f for f in order if f not in missing]
        else:
            problem = f"spec.ipFamilies: no {'/'.join(missing)} service range (--service-cidr); not served"
            order = [f for f in order if f not in missing]
    return tuple(order), problem


def cluster_families(nets: tuple[Network, ...]) -> tuple[str, ...]:
    return tuple(_family_of_net(n) for n in nets)
