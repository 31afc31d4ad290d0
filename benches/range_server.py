"""A static file server with HTTP range requests and ETags, for benches/remote.sh.

Serves the files of one directory on 127.0.0.1 (the port the OS picks is printed on the
first line), and counts what it is asked: GET /__stats answers {"requests", "bytes"}
(counted since the last GET /__reset), which the benchmark reads to report requests and
bytes per MiB read.
"""

import http.server
import json
import os
import socketserver
import sys
import threading

ROOT = os.path.realpath(sys.argv[1])
LOCK = threading.Lock()
STATS = {"requests": 0, "bytes": 0}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code, headers, body=b"", head=False):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k == "Content-Length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _serve(self, head):
        path = self.path.split("?")[0]
        if path == "/__stats":
            with LOCK:
                return self._send(200, [], json.dumps(STATS).encode())
        if path == "/__reset":
            with LOCK:
                STATS.update(requests=0, bytes=0)
            return self._send(200, [])
        with LOCK:
            STATS["requests"] += 1
        full = os.path.realpath(os.path.join(ROOT, path.lstrip("/")))
        if not full.startswith(ROOT + "/") or not os.path.isfile(full):
            return self._send(404, [], head=head)
        st = os.stat(full)
        size = st.st_size
        etag = '"%x-%x"' % (st.st_ino, st.st_mtime_ns)
        start, end, code = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            if a:
                start, end = int(a), min(int(b) if b else size - 1, size - 1)
            else:
                start, end = max(size - int(b), 0), size - 1
            if start >= size:
                return self._send(416, [("Content-Range", "bytes */%d" % size)], head=head)
            code = 206
        headers = [("ETag", etag), ("Accept-Ranges", "bytes"),
                   ("Content-Length", str(end - start + 1))]
        if code == 206:
            headers.append(("Content-Range", "bytes %d-%d/%d" % (start, end, size)))
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        with open(full, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
                with LOCK:
                    STATS["bytes"] += len(chunk)

    def do_GET(self):
        self._serve(False)

    def do_HEAD(self):
        self._serve(True)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


srv = Server(("127.0.0.1", 0), Handler)
print(srv.server_address[1], flush=True)
srv.serve_forever()
