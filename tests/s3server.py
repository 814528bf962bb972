"""A local S3 server (moto's, on 127.0.0.1) that logs every request it answers and can refuse some: what the object
store tests count and break."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import unquote

from moto.server import ThreadedMotoServer


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # /bucket/key
    query: str

    @property
    def kind(self) -> str:
        """GET, HEAD, PUT, DELETE, LIST (a bucket listing) or BULK-DELETE (one request deleting many keys)."""
        if self.method == "GET" and "list-type" in self.query:
            return "LIST"
        if self.method == "POST" and "delete" in self.query:
            return "BULK-DELETE"
        return self.method


class S3Server:
    """moto's S3 server on a free port of 127.0.0.1, with a log of the requests it answered.

    Attributes:
        options: fsspec storage options that reach it.
        requests: Every request answered, in order.
        refuse: A test's predicate: requests it accepts are answered 403 AccessDenied.
    """

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's own request log
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.requests: list[Request] = []
        self.refuse: Callable[[Request], bool] | None = None
        self._lock = threading.Lock()

    def start(self) -> S3Server:
        self._server.start()
        wsgi = self._server._server
        app = wsgi.app

        def logged(environ, start_response):
            request = Request(environ["REQUEST_METHOD"], unquote(environ["PATH_INFO"]), environ["QUERY_STRING"])
            with self._lock:
                self.requests.append(request)
            if self.refuse is not None and self.refuse(request):
                start_response("403 Forbidden", [("Content-Type", "application/xml")])
                return [b"<Error><Code>AccessDenied</Code><Message>refused by the test</Message></Error>"]
            return app(environ, start_response)

        wsgi.app = logged
        port = wsgi.server_address[1]
        self.options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        return self

    def stop(self) -> None:
        self._server.stop()

    @contextmanager
    def counting(self) -> Iterator[list[Request]]:
        """The requests answered while the block runs."""
        with self._lock:
            start = len(self.requests)
        seen: list[Request] = []
        try:
            yield seen
        finally:
            with self._lock:
                seen.extend(self.requests[start:])


def kinds(requests: list[Request]) -> Counter:
    return Counter(request.kind for request in requests)
