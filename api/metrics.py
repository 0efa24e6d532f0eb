"""Prometheus metrics in the text exposition format (version 0.0.4), without extra dependencies.

One ``Metrics`` object per app, so several apps in one process (tests) do not share counters.
Labels are bounded by construction: routes are path templates (``/v1/images/{image_id}``), never raw
paths, so a scanner cannot blow up the number of series.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class Counter:
    """A monotonically increasing count per label set."""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        self.name, self.doc, self.label_names = name, doc, tuple(labels)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for labels, value in items:
            yield f"{self.name}{_labels(self.label_names, labels)} {_num(value)}"


class Gauge:
    """A value computed when scraped (e.g. images in the collection, model ready)."""

    def __init__(self, name: str, doc: str, read) -> None:
        self.name, self.doc, self._read = name, doc, read

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} gauge"
        try:
            value = float(self._read())
        except Exception:  # noqa: BLE001 - a failing probe must not break the whole scrape
            value = float("nan")
        yield f"{self.name} {_num(value) if not math.isnan(value) else 'NaN'}"


class CounterFunc(Gauge):
    """A count kept elsewhere (a worker's own tally), read when scraped and exposed as a counter: it only
    grows, so Prometheus must see ``counter`` (``rate()`` works) and the name must end in ``_total``."""

    def __init__(self, name: str, doc: str, read) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"a counter's name ends in _total (Prometheus naming): {name}")
        super().__init__(name, doc, read)

    def render(self) -> Iterable[str]:
        for line in super().render():
            yield line.replace(" gauge", " counter") if line.startswith("# TYPE ") else line


class Histogram:
    """Cumulative buckets, sum and count per label set."""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS):
        self.name, self.doc, self.label_names = name, doc, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple[str, ...], list[float]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            row = self._data.setdefault(labels, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    row[i] += 1
            row[-2] += value
            row[-1] += 1

    def count(self, *labels: str) -> float:
        row = self._data.get(labels)
        return row[-1] if row else 0.0

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        for labels, row in items:
            for bound, n in zip(self.buckets, row):
                le = 'le="' + _num(bound) + '"'
                yield f"{self.name}_bucket{_labels(self.label_names, labels, le)} {_num(n)}"
            le = 'le="+Inf"'
            yield f"{self.name}_bucket{_labels(self.label_names, labels, le)} {_num(row[-1])}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_num(row[-2])}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {_num(row[-1])}"


class Metrics:
    """The service's metrics: HTTP requests and latency, searches, answers, model batches, uploads."""

    def __init__(self) -> None:
        self.requests = Counter("f2b_http_requests_total", "HTTP requests by method, route template and status.",
                                ("method", "route", "status"))
        self.latency = Histogram("f2b_http_request_duration_seconds", "Time to the response head, by route.",
                                 ("method", "route"))
        self.searches = Counter("f2b_searches_total", "Searches by query kind (text, image, like, embedding).",
                                ("kind",))
        self.search_latency = Histogram("f2b_search_duration_seconds", "Search time including query encoding.",
                                        ("kind",))
        self.answers = Counter("f2b_answers_total", "Questions answered, by mode (json, stream).", ("mode",))
        self.uploads = Counter("f2b_uploads_total", "Uploads by outcome (added, duplicate, rejected).", ("outcome",))
        self.model_batch = Histogram("f2b_model_text_batch_size", "Texts encoded together in one model call.",
                                     (), BATCH_BUCKETS)
        self.extra: list[Gauge] = []

    def gauge(self, name: str, doc: str, read) -> None:
        self.extra.append(Gauge(name, doc, read))

    def counter(self, name: str, doc: str, read) -> None:
        """A monotonically growing count read when scraped (``CounterFunc``: name ending in ``_total``)."""
        self.extra.append(CounterFunc(name, doc, read))

    def render(self) -> str:
        parts: list[str] = []
        for metric in (self.requests, self.latency, self.searches, self.search_latency, self.answers, self.uploads,
                       self.model_batch, *self.extra):
            parts.extend(metric.render())
        return "\n".join(parts) + "\n"
