"""The page in a real browser (Playwright driving Debian's Chromium, headless) against the real server with an
API key: the key is asked for once, a message streams its reply, the focus map draws one mark per working-context
entry, a document upload fills the progress bar and grows the map. Saves a screenshot and prints its path.

Skipped, with the reason, only where Chromium or Playwright is missing (`bash dev/setup.sh` installs both:
Chromium with apt-get, Playwright through pyproject's dev extras; `playwright install` cannot download here)."""
import os
import shutil

import httpx
import pytest

from chat_server import chat_web_process
from nanochat.tokenizer import Tokenizer
from test_chat_memory import BUDGET, reference, tiny_nets, write_mc_checkpoint
from test_runtime import text_of

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
KEY = "browser-key"


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[dev]')")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium is not installed (apt-get install chromium; dev/setup.sh does it where apt-get works)")
    return sync_playwright


def test_page_chats_draws_the_focus_map_and_uploads(tiny_base_dir, tiny_docs, tmp_path):
    sync_playwright = browser_or_skip()
    base = str(tmp_path / "base")
    for sub in ("base_data", "tokenizer"):
        shutil.copytree(os.path.join(tiny_base_dir, sub), os.path.join(base, sub))
    tok = Tokenizer.from_directory(os.path.join(base, "tokenizer"))
    nets = tiny_nets(tok)
    write_mc_checkpoint(base, nets)
    doc = tmp_path / "notes.txt"
    doc.write_text(text_of(8 * BUDGET, tok, tiny_docs))
    with chat_web_process(base, "--source", "sft", "--max-tokens", "8", key=KEY) as url, sync_playwright() as p:
        def stats(cid):
            r = httpx.get(f"{url}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            return r.json()["stats"]
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            # the page is served without the key; its first API call asks for it
            page.wait_for_selector("#keyform", state="visible", timeout=30000)
            page.fill("#apikey", KEY)
            page.click("#keyform button")
            page.wait_for_selector("#conversations li.active", timeout=30000)
            cid = page.locator("#conversations li.active").get_attribute("data-id")
            assert page.evaluate("sessionStorage.getItem('nanochat.api_key')") == KEY
            # a message streams its reply (greedy, so it is the reply the conversation gives alone)
            page.fill("#temperature", "0")
            page.fill("#input", "Where is the garden?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=60000)
            reply = page.locator(".msg.assistant").last.text_content()
            assert reply == reference(tok, nets, ["Where is the garden?"], 8)[0] and reply
            # the focus map: one mark per working-context entry, counters as the server has them
            st = stats(cid)
            page.wait_for_function(f"document.getElementById('stat-tokens').textContent === '{st['num_tokens']:,}'",
                                   timeout=30000)
            assert page.locator("#map rect.wc-entry").count() == st["wc_entries"] > 0
            assert page.text_content("#stat-budget") == f"{st['wc_cost']} / {st['budget']}"
            # a document: the progress bar fills, the memory and the map grow (gists appear)
            page.set_input_files("#file", str(doc))
            page.click("#uploadBtn")
            page.wait_for_function("document.getElementById('uploadStatus').textContent.includes('read into memory')",
                                   timeout=60000)
            assert page.evaluate("document.getElementById('progress').value") == 1
            grown = stats(cid)
            assert grown["num_tokens"] > st["num_tokens"] + 4 * BUDGET and grown["turns"] == 4
            page.wait_for_function(
                f"document.getElementById('stat-tokens').textContent === '{grown['num_tokens']:,}'", timeout=30000)
            assert page.locator("#map rect.wc-entry").count() == grown["wc_entries"]
            assert page.locator("#map rect.wc-entry[data-level='1']").count() > 0
            assert page.text_content("#stat-refocus") == str(grown["refocus_count"])
            # hovering a raw block shows its span and its text
            raw = page.locator("#map rect.wc-entry[data-level='0']").last
            raw.hover()
            tip = page.text_content("#tooltip")
            assert page.is_visible("#tooltip") and tip.startswith("raw block \u00b7 tokens")
            shot = tmp_path / "chat_web.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}")
            assert shot.stat().st_size > 10000 and not errors, errors
        finally:
            browser.close()
