"""Headless chromium driven through the DevTools protocol, for the tests that open a report in a real browser."""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]
ERROR_EVENTS = ("Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded")
PAGE_FACTS = """JSON.stringify({
  title: document.title,
  images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
  charts: [...document.querySelectorAll('svg')].map(s => {
    const box = s.getBoundingClientRect();
    return box.width > 0 && box.height > 0 && s.querySelectorAll('path').length > 0;
  }),
  headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
  sanity_lines: [...document.querySelectorAll('svg[aria-label$="to the trained map"]')].map(s =>
    [...s.querySelectorAll('path[clip-path]')].filter(p => p.style.strokeWidth === '1.6')
      .map(p => p.getAttribute('d').match(/[ML]/g).length)),
})"""


class Chromium:
    """Headless chromium driven through the DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and 4:
    NUL-separated JSON messages; no port, no websocket)."""

    def __init__(self, profile: Path) -> None:
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def child_fds() -> None:  # move the pipe ends to 3 and 4 without clobbering either
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(
            command, close_fds=False, preexec_fn=child_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict[str, Any]:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            if answer.get("id") == self._id:
                assert "error" not in answer, f"{method}: {answer['error']}"
                return answer["result"]
            self.events.append(answer)

    def _receive(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def load(self, url: str) -> tuple[dict[str, Any], list[dict], list[str]]:
        """Open ``url`` in a new page: its facts (PAGE_FACTS), its error events and every URL it requested."""
        self.events.clear()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive())
        facts = self.send("Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True}, session=session)
        self.send("Target.closeTarget", {"targetId": target})
        errors = [
            e["params"]
            for e in self.events
            if e.get("method") in ERROR_EVENTS
            and (e["method"] != "Runtime.consoleAPICalled" or e["params"]["type"] in ("error", "assert"))
            and (e["method"] != "Log.entryAdded" or e["params"]["entry"]["level"] == "error")
        ]
        sent = [e for e in self.events if e.get("method") == "Network.requestWillBeSent"]
        requests = [e["params"]["request"]["url"] for e in sent]
        return json.loads(facts["result"]["value"]), errors, requests

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.process.wait(timeout=10)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            os.close(self._write)
            os.close(self._read)
