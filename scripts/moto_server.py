#!/usr/bin/env python3
"""Run moto's SQS server on 127.0.0.1 until stdin closes.

Prints `port=N` once the server answers. Tying the server's life to stdin
means it dies with whoever started it (a test binary, a script), so no
emulator outlives the tests.
"""
import sys
import urllib.request

from moto.server import ThreadedMotoServer

port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
host, port = server.get_host_and_port()
urllib.request.urlopen(f"http://{host}:{port}/moto-api/", timeout=10).read()
print(f"port={port}", flush=True)
try:
    sys.stdin.read()
finally:
    server.stop()
