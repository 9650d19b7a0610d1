#!/usr/bin/env python3
"""Screenshot of a running cachetail's dashboard, for the README (standard library only).

Drives Debian's headless Chromium through chromedriver (apt-get install chromium chromium-driver):

    cargo run --release -- demo --listen 127.0.0.1:8080 &
    python3 docs/screenshot.py http://127.0.0.1:8080/ui docs/dashboard.png --wait 30
"""

import argparse
import base64
import json
import socket
import subprocess
import tempfile
import time
import urllib.request

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--disable-dev-shm-usage",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["value"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=20, help="seconds of live data first")
    args = parser.parse_args()

    port = free_port()
    driver = subprocess.Popen(["/usr/bin/chromedriver", f"--port={port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if call(base, "GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("chromedriver did not start")
            time.sleep(0.1)
        with tempfile.TemporaryDirectory() as profile:
            flags = FLAGS + [f"--user-data-dir={profile}",
                             f"--window-size={args.width},{args.height}"]
            session = call(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": flags}}}})
            sid = session["sessionId"]
            try:
                call(base, "POST", f"/session/{sid}/url", {"url": args.url})
                time.sleep(args.wait)  # let the charts and the feed fill with live data
                png = base64.b64decode(call(base, "GET", f"/session/{sid}/screenshot"))
                with open(args.out, "wb") as f:
                    f.write(png)
                print(f"{args.out}: {len(png)} bytes")
            finally:
                call(base, "DELETE", f"/session/{sid}")
    finally:
        driver.kill()
        driver.wait()


if __name__ == "__main__":
    main()
