"""A minimal W3C WebDriver client for headless Chromium (Debian's ``chromium`` and
``chromium-driver``): start ChromeDriver on a loopback port, open a session, go to a page, run
JavaScript in it, wait for a condition. Enough for the status page's test, without Selenium."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# No connections beyond the page: this machine's network is closed, and Chromium's background
# services would otherwise try (and fail) at every start.
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions"]


def missing() -> str:
    """Why no browser test can run here ('' if it can)."""
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if absent:
        return (f"{' and '.join(absent)} not found: install Debian's chromium and "
                "chromium-driver (apt-get install chromium chromium-driver) to run it")
    return ""


class Browser:
    def __init__(self, timeout: float = 60.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._profile = tempfile.mkdtemp(prefix="shoal-chromium-")
        self._driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._base = f"http://127.0.0.1:{port}"
        self._session = None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._call("GET", "/status")
                    break
                except (urllib.error.URLError, ConnectionError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                    "goog:chromeOptions": {"binary": CHROMIUM,
                                           "args": ARGS + [f"--user-data-dir={self._profile}"]}}}}
            self._session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self._base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.read().decode()[:500]}") from e

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self._session}/url", {"url": url})

    def js(self, script: str, *args):
        """Run ``script`` (a function body: ``return ...``) in the page; its value."""
        return self._call("POST", f"/session/{self._session}/execute/sync",
                          {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float = 30.0, what: str = ""):
        """Poll ``script`` until it returns something truthy; that value."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.js(script)
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"page did not show {what or script!r} in {timeout} s")
            time.sleep(0.2)

    def close(self) -> None:
        try:
            if self._session is not None:
                self._call("DELETE", f"/session/{self._session}")
        except Exception:
            pass
        self._driver.kill()
        self._driver.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
