"""Log-linear latency histogram (the HdrHistogram idea, reduced to what we need).

Values are integers in microseconds. Below 2**SUB_BITS every value has its own bucket; above,
each power of two is split into 2**(SUB_BITS-1) equal buckets, so a bucket's width is at most
1/2**(SUB_BITS-1) of its value: with SUB_BITS = 8 that is < 0.8 % relative error, in ~3,000
buckets for values up to an hour. Counts live in a plain list so `record` is a few integer
operations (it runs once per request in the load generator) and histograms from several worker
processes merge by adding lists.
"""

from __future__ import annotations

SUB_BITS = 8
_SUB = 1 << SUB_BITS
_HALF = _SUB >> 1


def bucket_of(v: int) -> int:
    if v < _SUB:
        return max(0, v)
    shift = v.bit_length() - SUB_BITS
    return _SUB + (shift - 1) * _HALF + ((v >> shift) - _HALF)


def bucket_bounds(i: int) -> tuple[int, int]:
    """Inclusive [low, high] values that land in bucket i."""
    if i < _SUB:
        return i, i
    shift = (i - _SUB) // _HALF + 1
    top = (i - _SUB) % _HALF + _HALF
    low = top << shift
    return low, low + (1 << shift) - 1


class Histogram:
    __slots__ = ("counts", "max", "min", "sum", "total")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * (_SUB + 20 * _HALF)  # grows on demand
        self.total = 0
        self.sum = 0
        self.max = 0
        self.min = -1

    def record(self, v_us: int) -> None:
        if v_us < _SUB:
            i = max(0, v_us)
        else:
            shift = v_us.bit_length() - SUB_BITS
            i = _SUB + (shift - 1) * _HALF + ((v_us >> shift) - _HALF)
        try:
            self.counts[i] += 1
        except IndexError:
            self.counts.extend([0] * (i + 1 - len(self.counts)))
            self.counts[i] += 1
        self.total += 1
        self.sum += v_us
        self.max = max(self.max, v_us)
        if self.min < 0 or v_us < self.min:
            self.min = v_us

    def merge(self, other: Histogram) -> None:
        if len(other.counts) > len(self.counts):
            self.counts.extend([0] * (len(other.counts) - len(self.counts)))
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.total += other.total
        self.sum += other.sum
        self.max = max(self.max, other.max)
        if other.min >= 0 and (self.min < 0 or other.min < self.min):
            self.min = other.min

    def percentile(self, p: float) -> int:
        """Value at percentile p (0-100): the upper bound of the bucket that holds it, capped
        at the observed maximum (conservative, like HdrHistogram's highestEquivalentValue)."""
        if self.total == 0:
            return 0
        rank = max(1, round(p / 100.0 * self.total + 0.4999999))
        seen = 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                if seen >= rank:
                    return min(bucket_bounds(i)[1], self.max)
        return self.max

    def summary_ms(self) -> dict:
        def ms(us: int) -> float:
            return round(us / 1000.0, 3)

        return {
            "count": self.total,
            "min": ms(max(self.min, 0)),
            "mean": ms(self.sum / self.total) if self.total else 0.0,
            "p50": ms(self.percentile(50)),
            "p90": ms(self.percentile(90)),
            "p99": ms(self.percentile(99)),
            "p999": ms(self.percentile(99.9)),
            "max": ms(self.max),
        }

    def to_json(self) -> dict:
        """Sparse form: {"b": [[bucket, count], ...], ...} - compact and mergeable."""
        return {
            "b": [[i, c] for i, c in enumerate(self.counts) if c],
            "total": self.total,
            "sum": self.sum,
            "max": self.max,
            "min": self.min,
        }

    @classmethod
    def from_json(cls, d: dict) -> Histogram:
        h = cls()
        for i, c in d["b"]:
            if i >= len(h.counts):
                h.counts.extend([0] * (i + 1 - len(h.counts)))
            h.counts[i] += c
        h.total, h.sum, h.max, h.min = d["total"], d["sum"], d["max"], d["min"]
        return h
