"""The server's counters and histograms, rendered in Prometheus' text exposition format (version 0.0.4) for
`GET /metrics`: what a scraper needs to watch a serving process, with no client library to install."""
import bisect
import threading

# (name, help, bucket upper bounds) of the histograms the server keeps
HISTOGRAMS = {
    "tinyqa_request_seconds": ("Time from a request's arrival to its answer.",
                               (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
    "tinyqa_batch_windows": ("Windows in one forward pass of the model.", (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    "tinyqa_batch_seconds": ("Time of one forward pass of the model.",
                             (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)),
}
COUNTERS = {
    "tinyqa_requests_total": "Requests answered, by path and status.",
    "tinyqa_questions_total": "Questions answered.",
    "tinyqa_batch_tokens_total": "Tokens through the model.",
}


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counters = {}  # (name, labels) -> value
        self.histograms = {name: ([0] * (len(bounds) + 1), [0.0]) for name, (_, bounds) in HISTOGRAMS.items()}

    def count(self, name, n=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def observe(self, name, value):
        bounds = HISTOGRAMS[name][1]
        with self.lock:
            counts, total = self.histograms[name]
            counts[bisect.bisect_left(bounds, value)] += 1
            total[0] += value

    def render(self, gauges) -> str:
        """The exposition text; gauges: {name: (help, value)} read at the time of the scrape."""
        lines = []
        with self.lock:
            for name, text in COUNTERS.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
                rows = [(labels, v) for (n, labels), v in sorted(self.counters.items()) if n == name] or [((), 0)]
                lines += [f"{name}{_labels(labels)} {v}" for labels, v in rows]
            for name, (text, bounds) in HISTOGRAMS.items():
                counts, total = self.histograms[name]
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
                cumulative = 0
                for bound, c in zip([*map(str, bounds), "+Inf"], counts):
                    cumulative += c
                    lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
                lines += [f"{name}_sum {total[0]}", f"{name}_count {cumulative}"]
        for name, (text, value) in gauges.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _labels(labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"
