"""Record a real watch stream for tests/test_kube_source.py (run by hand, not by pytest).

    eval "$(scripts/kube-apiserver.sh start /tmp/kube-rec)"
    .venv/bin/python tests/data/kube/record.py          # writes pods-list.json, pods-watch.jsonl
    scripts/kube-apiserver.sh stop /tmp/kube-rec

What happens, in namespace `rec`: pod rec-a exists before the list; the watch (from the
list's resourceVersion, bookmarks allowed, timeoutSeconds=12) then sees rec-b created, given an
IP and made Ready, rec-a relabelled, rec-c created on a node, deleted gracefully (it gets a
deletionTimestamp and stays: there is no kubelet) and then force-deleted, rec-b deleted; the
server ends the watch after sending a BOOKMARK. Then the API server is restarted (stop + start
of the same DIR) after a ConfigMap was created, and a watch from the last resourceVersion gets
the 410 "too old resource version" ERROR event (the restarted watch cache starts at the current
revision, which the ConfigMap moved), appended as the last line. Lines are stored exactly as the server sent them.
"""

import json
import os
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER, TOKEN, DIR = os.environ["KUBE_SERVER"], os.environ["KUBE_TOKEN"], os.environ["KUBE_DIR"]
CTX = ssl.create_default_context(cafile=os.path.join(DIR, "ca.crt"))
NS = "/api/v1/namespaces/rec"


def call(method, path, body=None, ctype="application/json"):
    req = urllib.request.Request(SERVER + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, context=CTX, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {path}: {e.code} {e.read()[:300]!r}") from e


def pod(name, node=None):
    spec = {"containers": [{"name": "app", "image": "example.invalid/app:1",
                            "ports": [{"name": "http", "containerPort": 8080}]}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "rec"}}, "spec": spec}


def watch_lines(path, out):
    req = urllib.request.Request(SERVER + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, context=CTX, timeout=60) as r:
        for line in r:
            out.append(line.decode().rstrip("\n"))


def main():
    call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "rec"}})
    call("POST", f"{NS}/pods", pod("rec-a"))
    listing = call("GET", f"{NS}/pods")
    rv = listing["metadata"]["resourceVersion"]
    lines: list[str] = []
    t = threading.Thread(target=watch_lines, args=(
        f"{NS}/pods?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=12", lines))
    t.start()
    time.sleep(0.5)
    call("POST", f"{NS}/pods", pod("rec-b"))
    call("PATCH", f"{NS}/pods/rec-b/status", {"status": {"phase": "Running", "podIP": "127.0.10.2",
                                                         "podIPs": [{"ip": "127.0.10.2"}],
                                                         "conditions": [{"type": "Ready", "status": "True"}]}},
         "application/merge-patch+json")
    call("PATCH", f"{NS}/pods/rec-a", {"metadata": {"labels": {"app": "rec", "tier": "web"}}},
         "application/merge-patch+json")
    call("POST", f"{NS}/pods", pod("rec-c", node="node-1"))
    call("DELETE", f"{NS}/pods/rec-c")                                  # graceful: deletionTimestamp
    call("DELETE", f"{NS}/pods/rec-c", {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
    call("DELETE", f"{NS}/pods/rec-b")
    t.join(60)
    last_rv = json.loads(lines[-1])["object"]["metadata"]["resourceVersion"]
    # Something else changes while the pod watcher is away (etcd's revision is global), so the
    # restarted server's pod cache starts after last_rv: the classic 410 after a restart.
    call("POST", f"{NS}/configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bump"}})
    script = os.path.join(HERE, "..", "..", "..", "scripts", "kube-apiserver.sh")
    subprocess.run(["bash", script, "stop", DIR], check=True)
    subprocess.run(["bash", script, "start", DIR], check=True, stdout=subprocess.DEVNULL)
    gone: list[str] = []
    watch_lines(f"{NS}/pods?watch=1&resourceVersion={last_rv}&allowWatchBookmarks=true&timeoutSeconds=5", gone)
    lines += gone
    # The list the source would see before its watch (all namespaces: just this namespace's).
    with open(os.path.join(HERE, "pods-list.json"), "w") as f:
        json.dump(listing, f, indent=1)
        f.write("\n")
    with open(os.path.join(HERE, "pods-watch.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"list at resourceVersion {rv}: {[i['metadata']['name'] for i in listing['items']]}")
    for line in lines:
        ev = json.loads(line)
        meta = ev["object"].get("metadata", {})
        print(ev["type"], meta.get("name"), meta.get("resourceVersion"), ev["object"].get("code", ""))


if __name__ == "__main__":
    main()
