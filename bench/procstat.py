"""CPU time and memory of a process tree, from /proc (Linux).

CPU is utime + stime of the root and every live descendant (/proc/<pid>/stat fields 14 and
15), plus cutime + cstime of the root (children it has already reaped, e.g. a restarted
worker). The benchmark reads it before and after a run; the delta divided by the requests
served is "proxy CPU per request".

Memory: RSS summed over the tree (VmRSS), and PSS when /proc/<pid>/smaps_rollup is readable —
PSS splits shared pages between the processes that share them, so forked workers are not
counted twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class TreeStat:
    cpu_s: float
    rss_bytes: int
    pss_bytes: int
    pids: tuple[int, ...]

    @property
    def rss_mib(self) -> float:
        return self.rss_bytes / 1048576

    @property
    def pss_mib(self) -> float:
        return self.pss_bytes / 1048576


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is None:
            continue
        ppid = int(f[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _rss(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pss = rss
    return rss, pss


def tree(roots: list[int] | tuple[int, ...]) -> TreeStat:
    """CPU seconds and memory of `roots` and all their live descendants."""
    ticks = 0
    rss = pss = 0
    pids: list[int] = []
    seen: set[int] = set()
    for root in roots:
        for pid in descendants(root):
            if pid in seen:
                continue
            seen.add(pid)
            f = _stat_fields(pid)
            if f is None:
                continue
            # fields 14..17 (utime, stime, cutime, cstime) are rest[11..14]
            ticks += int(f[11]) + int(f[12])
            if pid == root:
                ticks += int(f[13]) + int(f[14])
            r, p = _rss(pid)
            rss += r
            pss += p
            pids.append(pid)
    return TreeStat(cpu_s=ticks / _TICK, rss_bytes=rss, pss_bytes=pss, pids=tuple(pids))


def main() -> None:
    import sys

    pids = [int(a) for a in sys.argv[1:]] or [os.getpid()]
    t = tree(pids)
    print(f"pids {list(t.pids)} cpu {t.cpu_s:.2f} s rss {t.rss_mib:.1f} MiB pss {t.pss_mib:.1f} MiB")


if __name__ == "__main__":
    main()
