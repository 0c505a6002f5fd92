"""Opens a report page (fedstep job report / fedstep simulate) in headless
Chromium and checks what a reader would see:

- the page loads with no console message at error level and no failed
  request (it must be self-contained: no network, no script);
- the rendered DOM holds exactly the expected number of charts (inline
  <svg> elements inside <figure>s);
- a screenshot is not blank: more than 2% of its pixels are not white.

    python3 scripts/check_report_page.py PAGE.html EXPECTED_CHARTS

Fails (exit 1) if Chromium is missing: under CI this is a test, not an
optional extra. scripts/test.sh installs Debian's chromium package.
"""

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("check_report_page: no chromium on PATH (Debian: apt-get install chromium)")


def run(browser, profile, args):
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def png_pixels(path):
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA PNG."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unexpected PNG {header}"
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def main():
    page, expected = os.path.abspath(sys.argv[1]), int(sys.argv[2])
    browser = chromium()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        dom = run(browser, os.path.join(tmp, "p1"), ["--dump-dom", f"file://{page}"])
        if dom.returncode != 0:
            sys.exit(f"check_report_page: chromium --dump-dom failed: {dom.stderr[-2000:]}")
        console = [
            l for l in dom.stderr.splitlines()
            if "CONSOLE" in l and re.search(r"error|Uncaught|Failed to load", l, re.I)
        ]
        if console:
            failures.append("console errors:\n  " + "\n  ".join(console))
        charts = len(re.findall(r"<figure>\s*<figcaption>[^<]*</figcaption>\s*<svg", dom.stdout))
        if charts != expected:
            failures.append(f"{charts} charts rendered, expected {expected}")
        if re.search(r"<script|https?://(?!www\.w3\.org)", dom.stdout):
            failures.append("the page has a script or an external address")

        shot = os.path.join(tmp, "shot.png")
        r = run(browser, os.path.join(tmp, "p2"), [f"--screenshot={shot}", "--window-size=1200,2400", f"file://{page}"])
        if r.returncode != 0 or not os.path.exists(shot):
            sys.exit(f"check_report_page: chromium --screenshot failed: {r.stderr[-2000:]}")
        width, height, bpp, rows = png_pixels(shot)
        inked = sum(
            1
            for row in rows
            for x in range(0, len(row), bpp)
            if min(row[x], row[x + 1], row[x + 2]) < 235
        )
        share = inked / (width * height)
        if share <= 0.02:
            failures.append(f"the screenshot is blank: {share:.2%} of its pixels are not white")
        if len(sys.argv) > 3:
            shutil.copy(shot, sys.argv[3])
    if failures:
        sys.exit("check_report_page: " + page + "\n" + "\n".join(failures))
    print(f"check_report_page: {page}: {charts} charts, {share:.1%} of a {width}x{height} screenshot inked, no console errors")


if __name__ == "__main__":
    main()
