"""
Screenshot of the web UI's focus map on a trained checkpoint (the README's picture): starts
`scripts.chat_web` on 127.0.0.1, uploads a document of held-out text with a pass key hidden in it,
asks for the key, and saves the page once the reply has streamed and the map has redrawn.

    python -m dev.focus_map_shot                       # $NANOCHAT_BASE_DIR's SFT model -> docs/focus_map.png
    python -m dev.focus_map_shot --tokens 20000 --out shot.png

Needs Chromium (`apt-get install chromium`) and Playwright for Python (the dev extras), and the held-out
corpus (`python -m nanochat.dataset --heldout`; `dev/runcpu.sh` fetches it).
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from nanochat.common import UserError, get_base_dir, run_main
from nanochat.dataset import load_heldout_text

CHROMIUM = "/usr/bin/chromium"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def document(chars, key):
    """`chars` characters of held-out prose with one sentence naming the pass key, a third of the way in."""
    text = load_heldout_text(max_chars=chars)
    cut = text.find(". ", len(text) // 3) + 2
    return text[:cut] + f"The pass key is {key}. Remember it. " + text[cut:]


def main(argv=None):
    p = argparse.ArgumentParser(description="Screenshot the web UI's focus map after a document and a question.")
    p.add_argument("--source", default="sft", choices=["base", "mid", "sft"])
    p.add_argument("--chars", type=int, default=60000, help="document length in characters (default 60000)")
    p.add_argument("--key", default="71942")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "focus_map.png"))
    args = p.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        raise UserError(f"{CHROMIUM} not found: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UserError("Playwright for Python is not installed: pip install -e '.[dev]'") from None
    doc = os.path.join(get_base_dir(), "report", "focus_map_document.txt")
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    with open(doc, "w", encoding="utf-8") as f:
        f.write(document(args.chars, args.key))
    port = free_port()
    memory = tempfile.TemporaryDirectory(prefix="focus_map_")  # a fresh memory: one document, one question
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--source", args.source, "--port", str(port),
                               "--max-tokens", "16", "--memory-root", memory.name],
                              cwd=REPO, env={k: v for k, v in os.environ.items() if k != "NANOCHAT_API_KEY"})
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise UserError(f"scripts.chat_web exited with status {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(url)
            page.wait_for_selector("#conversations li.active", timeout=60000)
            page.set_input_files("#file", doc)
            page.click("#uploadBtn")
            page.wait_for_function("document.getElementById('uploadStatus').textContent.includes('read into memory')",
                                   timeout=600000)
            page.fill("#temperature", "0")
            page.fill("#input", "What is the pass key?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=120000)
            page.wait_for_timeout(1000)  # the map's redraw after the reply's last refocus
            raw = page.locator("#map rect.wc-entry[data-level='0']").first
            box = raw.bounding_box()  # the tooltip of the oldest raw block: one focus opened
            raw.dispatch_event("mousemove", {"clientX": box["x"] + box["width"] / 2, "clientY": box["y"] + 4})
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            reply = page.locator(".msg.assistant").last.text_content()
            browser.close()
        print(f"wrote {args.out} (the reply: {reply!r}; the key: {args.key})")
    finally:
        server.terminate()
        server.wait(timeout=30)
        memory.cleanup()


if __name__ == "__main__":
    run_main(main)
