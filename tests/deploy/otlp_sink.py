"""An OTLP/gRPC trace receiver that stands in for Jaeger in the container test (no Jaeger binary can be had
here). tests/deploy/compose.test.yaml runs it as compose's `jaeger` service from the meshserve image, so
Envoy and the services export to jaeger:4317 exactly as they do to the real one. The spans it received are
served as JSON over HTTP, on Jaeger's UI port:

    GET /spans  ->  [{"service": ..., "name": ..., "trace_id": hex, "span_id": hex, "parent_span_id": hex}, ...]

Only the image's own packages (grpcio, opentelemetry-proto) and the standard library.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                received += [
                    {
                        "service": service,
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                    }
                    for span in scope_spans.spans
                ]
        with self.lock:
            self.spans += received
        return trace_service_pb2.ExportTraceServiceResponse()


def serve(otlp_port: int, http_port: int) -> None:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    server.add_insecure_port(f"0.0.0.0:{otlp_port}")
    server.start()

    class Spans(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/spans":
                self.send_error(404)
                return
            with receiver.lock:
                body = json.dumps(receiver.spans).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # one line per poll would drown the container log
            pass

    http = ThreadingHTTPServer(("0.0.0.0", http_port), Spans)
    # as PID 1 of its container it would ignore SIGTERM, and `docker compose stop` would wait for its grace period
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"otlp_sink: OTLP/gRPC on {otlp_port}, spans on http://0.0.0.0:{http_port}/spans", flush=True)
    http.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--otlp-port", type=int, default=4317)
    parser.add_argument("--http-port", type=int, default=16686)
    args = parser.parse_args()
    serve(args.otlp_port, args.http_port)
