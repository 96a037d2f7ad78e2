"""An OTLP/HTTP receiver that decodes what it gets with OpenTelemetry's own protobuf definitions
(the opentelemetry-proto package), not cvchain's code.

    otlp_receiver.py serve PORT OUT [CERT KEY]
        Listens on 127.0.0.1:PORT. POST /v1/traces and /v1/metrics (application/x-protobuf,
        gzip or not) are parsed as ExportTraceServiceRequest and ExportMetricsServiceRequest;
        each span and each metric data point is appended to OUT as one JSON line, ids in hex,
        attributes as a flat object, enums by name. The answer is the service's empty response,
        as a collector sends it. A body that does not parse is answered 400 and recorded as
        {"error": ...}. Prints "listening" when ready.

        It also plays Application Insights' ingestion endpoint: POST /v2/track and /v2.1/track
        (a gzip JSON array of telemetry envelopes, as Microsoft's SDKs send them) append each
        envelope as {"signal": "appinsights", "path": ..., "authorization": ..., "envelope":
        ...} and answer as the service does ({"itemsReceived", "itemsAccepted", "errors"}).

        With CERT and KEY (PEM files), it speaks https: Application Insights' exporter always
        sends to https, whatever the connection string's IngestionEndpoint says.
"""

import gzip
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def value(v: common_pb2.AnyValue):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


def spans(request: trace_service_pb2.ExportTraceServiceRequest):
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "signal": "span",
                    "resource": resource,
                    "scope": ss.scope.name,
                    "traceId": s.trace_id.hex(),
                    "spanId": s.span_id.hex(),
                    "parentSpanId": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": trace_pb2.Span.SpanKind.Name(s.kind),
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "attributes": attributes(s.attributes),
                    "events": [{"name": e.name, "attributes": attributes(e.attributes)}
                               for e in s.events],
                    "links": [{"traceId": l.trace_id.hex(), "spanId": l.span_id.hex()}
                              for l in s.links],
                    "status": {"code": trace_pb2.Status.StatusCode.Name(s.status.code),
                               "message": s.status.message},
                }


def points(request: metrics_service_pb2.ExportMetricsServiceRequest):
    for rm in request.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                data = getattr(m, kind)
                for p in data.data_points:
                    point = {
                        "signal": "metric",
                        "resource": resource,
                        "name": m.name,
                        "unit": m.unit,
                        "kind": kind,
                        "attributes": attributes(p.attributes),
                    }
                    if kind in ("sum", "gauge"):
                        point["value"] = getattr(p, p.WhichOneof("value"))
                    elif kind == "histogram":
                        point["count"] = p.count
                        point["sum"] = p.sum
                    if kind == "sum":
                        point["monotonic"] = data.is_monotonic
                        point["temporality"] = metrics_pb2.AggregationTemporality.Name(
                            data.aggregation_temporality)
                    yield point


def serve(port, out_path, cert=None, key=None):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if (self.headers.get("content-encoding") or "").lower() == "gzip":
                body = gzip.decompress(body)
            if self.path in ("/v2/track", "/v2.1/track"):
                try:
                    envelopes = json.loads(body)
                    records = [{"signal": "appinsights", "path": self.path,
                                "authorization": self.headers.get("authorization"),
                                "envelope": e} for e in envelopes]
                    status = 200
                    payload = json.dumps({"itemsReceived": len(envelopes),
                                          "itemsAccepted": len(envelopes),
                                          "errors": []}).encode()
                except Exception as e:  # noqa: BLE001
                    records = [{"signal": "error", "path": self.path,
                                "error": f"{type(e).__name__}: {e}"}]
                    status, payload = 400, b""
                with lock, open(out_path, "a", encoding="utf-8") as out:
                    for r in records:
                        out.write(json.dumps(r) + "\n")
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            try:
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    records = list(spans(request))
                    answer = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    request = metrics_service_pb2.ExportMetricsServiceRequest()
                    request.ParseFromString(body)
                    records = list(points(request))
                    answer = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    raise ValueError(f"no OTLP signal at {self.path}")
                if self.headers.get("content-type") != "application/x-protobuf":
                    raise ValueError(f"content-type {self.headers.get('content-type')!r}")
                status, payload = 200, answer.SerializeToString()
            except Exception as e:  # noqa: BLE001
                records = [{"signal": "error", "path": self.path, "error": f"{type(e).__name__}: {e}"}]
                status, payload = 400, b""
            with lock, open(out_path, "a", encoding="utf-8") as out:
                for r in records:
                    out.write(json.dumps(r) + "\n")
            try:
                self.send_response(status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the exporter timed out and left (the collector-away test makes it)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3], *sys.argv[4:6])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
