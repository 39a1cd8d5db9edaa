"""Open a run's report.html in a real headless Chromium: screenshot + a check that every image decodes.

Usage::

    PYTHONPATH=src python benchmarks/check_report_browser.py RUN [--out benchmarks/results] [--write]

``--write`` (re)writes ``RUN/report.html`` first (``vitpcm report RUN``). Then:

1. ``chromium --headless --screenshot`` of ``file://RUN/report.html`` at 1400 x 3000 ->
   ``OUT/report_screenshot.png`` (look at it);
2. a copy of the page with a small probe script appended (written beside the report, so
   relative links behave the same, and deleted afterwards) is loaded with ``--dump-dom``;
   the probe counts the images that the browser decoded (``complete`` and
   ``naturalWidth > 0``), the links, the tables, and the page height;
3. ``OUT/report_browser.log``: Chromium's version, both command lines, exit codes and the
   counts. Exit status 1 when an image did not decode or Chromium failed.

Chromium is not needed by the test suite (it checks the report's structure without a
browser); this script is the real-browser check, run where Chromium is installed
(Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var result = {
    images: imgs.length,
    images_decoded: ok.length,
    broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; }),
    smallest_image_px: ok.length ? Math.min.apply(null, ok.map(function (i) { return i.naturalWidth; })) : 0,
    links: document.links.length,
    tables: document.getElementsByTagName('table').length,
    page_height_px: document.documentElement.scrollHeight,
    title: document.title
  };
  var pre = document.createElement('pre');
  pre.id = 'vitpcm-probe';
  pre.textContent = 'VITPCM_PROBE' + JSON.stringify(result) + 'END_PROBE';
  document.body.appendChild(pre);
});
</script>
"""


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get install chromium (Debian) or put chromium on PATH")


def base_flags(profile: str) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder that holds report.html")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the PNG and the log go")
    parser.add_argument("--write", action="store_true", help="write RUN/report.html first")
    parser.add_argument("--size", default="1400,3000", help="window size for the screenshot (default 1400,3000)")
    args = parser.parse_args()

    run = Path(args.run).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.write:
        sys.path.insert(0, str(ROOT / "src"))
        from vitpcm.stages.report import report as write_report

        write_report(run, progress=False)
    report = run / "report.html"
    if not report.is_file():
        sys.exit(f"{report} not found: run `vitpcm report {run}` or pass --write")

    chrome = chromium_binary()
    version = subprocess.run([chrome, "--version"], capture_output=True, text=True).stdout.strip()
    log = [f"date: {time.strftime('%Y-%m-%d %H:%M')}", f"browser: {version} ({chrome})",
           f"report: {report} ({report.stat().st_size} bytes)"]  # fmt: skip
    failed = False

    with tempfile.TemporaryDirectory() as profile:
        shot = out / "report_screenshot.png"
        cmd = [chrome, *base_flags(profile), f"--screenshot={shot}", f"--window-size={args.size}", report.as_uri()]
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        log += [f"screenshot: {' '.join(cmd)}", f"  exit {proc.returncode} in {time.time() - t:.1f}s,"
                f" {shot.stat().st_size if shot.is_file() else 0} bytes -> {shot}"]  # fmt: skip
        failed |= proc.returncode != 0 or not shot.is_file()

    probe_page = report.with_name(".report-browser-probe.html")
    probe_page.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        with tempfile.TemporaryDirectory() as profile:
            cmd = [chrome, *base_flags(profile), "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        probe_page.unlink(missing_ok=True)
    match = re.search(r'<pre id="vitpcm-probe">VITPCM_PROBE(.*?)END_PROBE</pre>', proc.stdout, re.S)
    log.append(f"probe: {' '.join(cmd)}")
    log.append(f"  exit {proc.returncode}")
    if match:
        result = json.loads(html.unescape(match.group(1)))
        log.append("  " + json.dumps(result))
        failed |= result["images_decoded"] != result["images"] or result["images"] == 0
    else:
        log.append("  the probe did not report (page did not load?); stderr: " + proc.stderr[-500:])
        failed = True
    log.append("RESULT: " + ("FAIL" if failed else "OK: every image decoded in Chromium"))
    (out / "report_browser.log").write_text("\n".join(log) + "\n", encoding="utf-8")
    print("\n".join(log))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
