"""moto's server, with one request at a time.

moto 5.1.22's `moto_server` serves requests on threads and applies a
DynamoDB conditional write as a check and then an update with no lock
between them: two concurrent `UpdateItem`s with the same condition can
both succeed (measured: 3 of 100 trials of four concurrent claims of one
OPEN item had two winners). DynamoDB makes each conditional write atomic,
and fedstep's exactly-once rests on that (one claim of a round wins), so
the emulator tests would fail on the emulator's race, not ours. This runs
the same WSGI application as `moto_server`, with a lock around each
request: the server still accepts connections on threads, but moto handles
one request at a time, so every conditional write is atomic as in AWS.

    python scripts/moto_server.py HOST PORT
"""

import os
import sys
import threading

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def serialized(app):
    lock = threading.Lock()

    def handle(environ, start_response):
        with lock:
            # The response body is produced inside the lock too: moto builds
            # it from the backend's state.
            return list(app(environ, start_response))

    return handle


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, serialized(app), threaded=True)


if __name__ == "__main__":
    main()
