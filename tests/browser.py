"""Headless Chromium for the tests: load a page and report every resource that failed to load.

Talks the DevTools protocol over `--remote-debugging-pipe` (fds 3 and 4, NUL-separated JSON), so
it needs no extra package: Debian's `chromium` is enough.
"""

import json
import os
import select
import shutil
import subprocess
import tempfile
import time

BROKEN_IMAGES = ("Array.from(document.images)"
                 ".filter(im => !(im.complete && im.naturalWidth > 0)).map(im => im.src)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium():
    return shutil.which("chromium")


def page_load_problems(url, timeout=60.0):
    """(failed requests, broken images, number of requests) of loading `url` headless."""
    events, (broken,) = _load(url, [BROKEN_IMAGES], timeout)
    urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in events
            if e.get("method") == "Network.requestWillBeSent"}
    failed = [f"{urls.get(e['params']['requestId'], '?')}: {e['params']['errorText']}"
              for e in events if e.get("method") == "Network.loadingFailed"]
    return failed, broken, len(urls)


def page_values(url, expressions, timeout=60.0):
    """The values of JavaScript `expressions`, evaluated in turn once `url` has loaded."""
    return _load(url, expressions, timeout)[1]


def _load(url, expressions, timeout):
    """(DevTools events, values of `expressions`) of loading `url` headless."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()

    def wire():
        a, b = os.dup(to_child), os.dup(from_child)  # out of the way of 3 and 4 first
        os.dup2(a, 3)
        os.dup2(b, 4)

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}",
                                 "--remote-debugging-pipe", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                close_fds=False, preexec_fn=wire)
        os.close(to_child)
        os.close(from_child)
        buf, events, n = b"", [], [0]
        deadline = time.monotonic() + timeout

        def send(method, params=None, session=None):
            n[0] += 1
            msg = {"id": n[0], "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            os.write(from_parent, json.dumps(msg).encode() + b"\0")
            return n[0]

        def read_until(pred):
            nonlocal buf
            while True:
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    msg = json.loads(raw)
                    events.append(msg)
                    if pred(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"chromium: no answer within {timeout} s")
                ready, _, _ = select.select([to_parent], [], [], left)
                if ready:
                    chunk = os.read(to_parent, 1 << 16)
                    if not chunk:
                        raise RuntimeError("chromium closed the pipe")
                    buf += chunk

        try:
            i = send("Target.createTarget", {"url": "about:blank"})
            target = read_until(lambda m: m.get("id") == i)["result"]["targetId"]
            i = send("Target.attachToTarget", {"targetId": target, "flatten": True})
            session = read_until(lambda m: m.get("id") == i)["result"]["sessionId"]
            for method in ("Network.enable", "Page.enable"):
                i = send(method, session=session)
                read_until(lambda m, i=i: m.get("id") == i)
            send("Page.navigate", {"url": url}, session)
            read_until(lambda m: m.get("method") == "Page.loadEventFired")
            values = []
            for expression in expressions:
                i = send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                         session)
                values.append(read_until(lambda m, i=i: m.get("id") == i)
                              ["result"]["result"].get("value"))
            send("Browser.close")
        finally:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            os.close(from_parent)
            os.close(to_parent)
    return events, values
