#!/usr/bin/env python3
"""The guest's peer in the e2e network tests: an HTTP server on ADDR:PORT (in the test's network
namespace). GET /data sends 32 MiB of random bytes, GET /stream 64 MiB at 6 MiB/s (long enough to
migrate or kill a backend under it), POST /upload reads the body; each prints the SHA-256 of
what it sent or got as `PEER <what>=<hex>`, and /upload answers with it."""
import hashlib
import http.server
import os
import sys
import time

DATA = os.urandom(32 << 20)
STREAM = os.urandom(64 << 20)
RATE = 6 << 20


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_body(self, body, rate=None):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        chunk = 256 << 10
        t0 = time.monotonic()
        for off in range(0, len(body), chunk):
            self.wfile.write(body[off:off + chunk])
            if rate:
                ahead = (off + chunk) / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)

    def do_GET(self):
        if self.path.startswith("/data"):
            print(f"PEER data={hashlib.sha256(DATA).hexdigest()}", flush=True)
            self.send_body(DATA)
        elif self.path.startswith("/stream"):
            print(f"PEER stream={hashlib.sha256(STREAM).hexdigest()}", flush=True)
            self.send_body(STREAM, RATE)
        else:
            self.send_error(404)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        left = n
        while left > 0:
            b = self.rfile.read(min(left, 1 << 20))
            if not b:
                break
            h.update(b)
            left -= len(b)
        digest = h.hexdigest()
        print(f"PEER upload={digest}", flush=True)
        self.send_response(200)
        body = digest.encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    addr, port = sys.argv[1], int(sys.argv[2])
    server = http.server.ThreadingHTTPServer((addr, port), Handler)
    print("PEER listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
