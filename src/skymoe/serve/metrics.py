"""Prometheus metrics of the server, in a registry of its own (no process-global state).

Counters: HTTP requests by endpoint and status, prompt and generated tokens, finished
sequences by finish reason. Gauges: sequences waiting and running in the engine. Histograms:
time to first token, inter-token latency and end-to-end latency per sequence, in seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                    0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0,
                300.0, 600.0)


class Metrics:
    """The server's metrics; ``render()`` gives the Prometheus text exposition format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("skymoe_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("skymoe_prompt_tokens", "Prompt tokens of accepted "
                                     "sequences", registry=r)
        self.generation_tokens = Counter("skymoe_generation_tokens", "Generated tokens",
                                         registry=r)
        self.finished = Counter("skymoe_sequences_finished", "Finished sequences by finish "
                                "reason (stop, length, cancelled, error)", ["finish_reason"],
                                registry=r)
        self.waiting = Gauge("skymoe_num_requests_waiting", "Sequences waiting for a KV-cache "
                             "slot", registry=r)
        self.running = Gauge("skymoe_num_requests_running", "Sequences generating (holding a "
                             "KV-cache slot)", registry=r)
        self.ttft = Histogram("skymoe_time_to_first_token_seconds", "Arrival of the HTTP "
                              "request to its first generated token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("skymoe_inter_token_latency_seconds", "Time between successive "
                             "tokens of a sequence", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("skymoe_e2e_request_latency_seconds", "Arrival of the HTTP "
                             "request to the sequence's last token", buckets=_E2E_BUCKETS,
                             registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
