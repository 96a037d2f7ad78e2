"""What cvchain sends, checked by implementations that are not cvchain's.

    events_receiver.py serve PORT SECRET OUT [DELAY [MATCH]]
        A Standard Webhooks endpoint on 127.0.0.1:PORT: each POST is verified by the
        `standardwebhooks` library with SECRET and parsed by the CloudEvents SDK (HTTP binding,
        structured mode); one JSON line per request is appended to OUT when it is answered. A
        request that does not verify or parse is answered 400 and recorded with "ok": false.
        With DELAY, a slow receiver: each request (each whose body holds MATCH, when given) is
        answered DELAY seconds after it arrived. Each line says how many requests were in
        flight when it arrived ("inFlight", itself included).

    events_receiver.py parse < events.json
        A JSON array of texts, each a CloudEvent or an array of them (a queue message, an Event
        Grid batch): each event is parsed by the CloudEvents SDK's JSON format; prints one JSON
        line per event with its attributes, or exits 1 naming the one that does not parse.

    events_receiver.py read-queue CONNECTION_STRING QUEUE ENCODING COUNT
        Reads COUNT messages of QUEUE with Microsoft's queue SDK (azure-storage-queue), as a
        queue-triggered Function would: ENCODING `base64` decodes each with the SDK's
        TextBase64DecodePolicy (what the Functions queues extension does by default), `none`
        takes the text as it is. Each is deleted, parsed by the CloudEvents SDK's JSON format
        and printed as one JSON line of its attributes (plus "messageSize": the text as the
        queue held it). Exits 1 naming a message that does not decode or parse.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from cloudevents.core.formats.json import JSONFormat
from standardwebhooks import Webhook, WebhookVerificationError


def attributes(event):
    return {
        "id": event.get_id(),
        "source": event.get_source(),
        "type": event.get_type(),
        "subject": event.get_subject(),
        "time": event.get_time().isoformat() if event.get_time() else None,
        "specversion": event.get_specversion(),
        "datacontenttype": event.get_datacontenttype(),
        "data": event.get_data(),
        # The distributed-tracing extension, as the SDK reads it.
        "traceparent": event.get_extension("traceparent"),
        "tracestate": event.get_extension("tracestate"),
    }


def serve(port, secret, out_path, delay=0.0, match=None):
    webhook = Webhook(secret)
    lock = threading.Lock()
    in_flight = [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            with lock:
                in_flight[0] += 1
                arrived_with = in_flight[0]
            try:
                self.answer(arrived_with)
            finally:
                with lock:
                    in_flight[0] -= 1

        def answer(self, arrived_with):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            record = {"webhookId": headers.get("webhook-id"),
                      "contentType": headers.get("content-type"),
                      "traceparentHeader": headers.get("traceparent"),
                      "inFlight": arrived_with}
            if delay and (match is None or match.encode() in body):
                time.sleep(delay)
            try:
                webhook.verify(body, headers)
                event = from_http_event(HTTPMessage(headers=headers, body=body))
                record.update(attributes(event))
                record["ok"] = (record["webhookId"] == record["id"]
                                and headers.get("content-type", "").startswith("application/cloudevents+json"))
                status = 204 if record["ok"] else 400
            except (WebhookVerificationError, Exception) as e:  # noqa: BLE001
                record.update({"ok": False, "error": f"{type(e).__name__}: {e}"})
                status = 400
            with lock, open(out_path, "a", encoding="utf-8") as out:
                out.write(json.dumps(record, default=str) + "\n")
            self.send_response(status)
            self.end_headers()

        def do_HEAD(self):
            self.send_response(405)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("listening", flush=True)
    server.serve_forever()


def parse():
    fmt = JSONFormat()
    for text in json.load(sys.stdin):
        value = json.loads(text)
        for item in value if isinstance(value, list) else [value]:
            event = fmt.read(None, json.dumps(item).encode())
            print(json.dumps(attributes(event), default=str))


def read_queue(connection_string, queue, encoding, count):
    from azure.storage.queue import QueueClient, TextBase64DecodePolicy

    raw = QueueClient.from_connection_string(connection_string, queue)
    client = QueueClient.from_connection_string(
        connection_string, queue,
        message_decode_policy=TextBase64DecodePolicy() if encoding == "base64" else None)
    fmt = JSONFormat()
    got = 0
    empty = 0
    while got < count and empty < 50:
        # The text as held (no decoding), to measure it; then the same message decoded.
        peeked = raw.peek_messages(max_messages=1)
        if not peeked:
            empty += 1
            time.sleep(0.1)
            continue
        size = len(peeked[0].content.encode("utf-8"))
        try:
            message = next(iter(client.receive_messages(max_messages=1, visibility_timeout=30)))
        except Exception as e:  # noqa: BLE001
            sys.exit(f"message {got} does not decode as {encoding}: {type(e).__name__}: {e}: "
                     f"{peeked[0].content[:120]!r}")
        client.delete_message(message)
        try:
            event = fmt.read(None, message.content.encode("utf-8"))
        except Exception as e:  # noqa: BLE001
            sys.exit(f"message {got} is not a CloudEvent after {encoding} decoding: "
                     f"{type(e).__name__}: {e}: {message.content[:120]!r}")
        record = attributes(event)
        record["messageSize"] = size
        print(json.dumps(record, default=str), flush=True)
        got += 1
    if got < count:
        sys.exit(f"only {got} of {count} messages arrived")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4],
              float(sys.argv[5]) if len(sys.argv) > 5 else 0.0,
              sys.argv[6] if len(sys.argv) > 6 else None)
    elif sys.argv[1] == "parse":
        parse()
    elif sys.argv[1] == "read-queue":
        read_queue(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
