"""Regenerate docs/live.png: `slotgen live` on the demo storyboard with the miniature, driven by headless
Chromium (Debian's /usr/bin/chromium through Playwright), after a typed prompt with a transition.

    python scripts/live_screenshot.py [--out docs/live.png] [--story storyboards/demo.yaml]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "live.png"))
    ap.add_argument("--story", default=str(ROOT / "storyboards" / "demo.yaml"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "slotgen", "live", args.story, "--port", "0", "--out",
                                 str(Path(tmp) / "out")], stdout=subprocess.PIPE, text=True, env=env)
        try:
            url = proc.stdout.readline().split()[2]
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1100, "height": 720})
                page.goto(url)
                page.wait_for_function("window.slotgenLive.framesDrawn > 24", timeout=120_000)
                page.fill("#transition", "1")
                page.select_option("#blend", "slerp")
                page.fill("#prompt", "a yellow star moves up on a purple background")
                page.press("#prompt", "Enter")
                page.wait_for_function("window.slotgenLive.latencies.length >= 1", timeout=120_000)
                page.fill("#prompt", "a green square enters from the left on a white background")
                page.wait_for_timeout(1500)
                page.screenshot(path=args.out)
                page.click("#stop")
                page.wait_for_function("window.slotgenLive.state && window.slotgenLive.state.status == 'stopped'",
                                       timeout=120_000)
                browser.close()
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
