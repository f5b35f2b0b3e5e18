#!/usr/bin/env python3
"""Requests per second against the admin API's Unix socket: one keep-alive connection, a loop.

Usage: rate.py SOCKET SECONDS PATH...  e.g.
    python3 gateway/admin/scripts/rate.py waygate-data/admin.sock 3 /gateway/rules /devices
Keep SECONDS short on shared machines."""
import http.client, socket, sys, time, json
class UnixConn(http.client.HTTPConnection):
    def __init__(self, path): super().__init__("localhost"); self.path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); self.sock.connect(self.path)
sock, secs = sys.argv[1], float(sys.argv[2])
for path in sys.argv[3:]:
    c = UnixConn(sock); n = 0; t0 = time.perf_counter()
    while time.perf_counter() - t0 < secs:
        c.request("GET", path); r = c.getresponse(); body = r.read(); n += 1
    dt = time.perf_counter() - t0
    items = len(json.loads(body)["result"])
    print(f"{path}: {n} requests in {dt:.1f} s = {n/dt:.0f} req/s ({items} objects, {len(body)} bytes each)")
