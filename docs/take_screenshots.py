"""The site's build check in a real browser: build it, serve it, and screenshot three pages with headless Chromium
(Debian's ``chromium`` package): the home page, a tutorial at its first figures, and an API page.

    python docs/take_screenshots.py   # docs/screenshots/{home,tutorial_inspect_and_trust,api_training}.png

Needs the docs extra (``pip install -e ".[docs]"``) and ``chromium`` on the PATH; nothing is downloaded.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from PIL import Image

DOCS = Path(__file__).resolve().parent
WIDTH = 1280
#: page, file name, window height, and the band of the page kept (top, bottom): the tutorial's figures sit below its
#: first screen, so it is taken tall and cut to the band that shows the k̂ histogram and the verdict table
PAGES = [("index.html", "home", 1600, None),
         ("tutorials/inspect_and_trust.html", "tutorial_inspect_and_trust", 5200, (3600, 5200)),
         ("reference/api/training.html", "api_training", 1600, None)]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def main() -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("error: chromium not found (the screenshots); install Debian's chromium package", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "--site-dir", str(site)],
                       cwd=DOCS.parent, check=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
        handler = functools.partial(_Quiet, directory=str(site))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            for page, name, height, band in PAGES:
                shot = Path(tmp) / f"{name}.png"
                subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--window-size={WIDTH},{height}", "--virtual-time-budget=8000",
                                f"--screenshot={shot}", f"http://127.0.0.1:{server.server_port}/{page}"],
                               check=True, capture_output=True, timeout=300)
                image = Image.open(shot)
                if band is not None:
                    image = image.crop((0, band[0], WIDTH, band[1]))
                image.save(DOCS / "screenshots" / f"{name}.png", optimize=True)
                print(f"docs/screenshots/{name}.png: {page}")
        finally:
            server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
