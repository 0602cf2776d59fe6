"""Run ``meshproxy ARGS...`` as another uid: ``python tests/run_as.py UID ARGS...``.

What a pod's sidecar container does by running as its own uid (``--proxy-uid``, which
``meshproxy capture`` leaves alone). The interpreter here lives where only root may read, so
every module meshproxy may import later is imported first, as root; then the process drops to
UID (gid UID, no supplementary groups) and runs the CLI.
"""

import os
import sys

# Everything the sidecar imports lazily, and the standard-library modules those load on first
# use (codecs for hostnames, the ssl and http machinery of the identity sources).
import asyncio.sslproto  # noqa: F401
import encodings.idna  # noqa: F401
import http.client  # noqa: F401
import json  # noqa: F401
import ssl  # noqa: F401
import urllib.request  # noqa: F401

import uvloop  # noqa: F401
import yaml  # noqa: F401

import meshproxy.cli
import meshproxy.dataplane  # noqa: F401
import meshproxy.process  # noqa: F401
import meshproxy.sidecar  # noqa: F401


def main() -> int:
    uid = int(sys.argv[1])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    return meshproxy.cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
