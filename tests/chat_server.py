"""Helpers for the serving tests: a real uvicorn server (a subprocess running scripts.chat_web, or in a thread
of the test for an app built in-process) and the parsing of server-sent events."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sse_data(lines):
    """The payloads of `data: ...` lines: parsed JSON, or the string "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chunks_text(events):
    """The reply text of a list of chat.completion.chunk payloads."""
    return "".join(c["choices"][0]["delta"].get("content", "") for c in events
                   if isinstance(c, dict) and c.get("choices"))


def wait_healthy(url, proc=None, key=None, timeout=180):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.time() + timeout
    while True:
        if proc is not None:
            assert proc.poll() is None, f"server exited early:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"server did not come up within {timeout} s"
        try:
            if httpx.get(url + "/health", headers=headers, timeout=2).json()["status"] == "ok":
                return
        except (httpx.HTTPError, ValueError, KeyError):
            time.sleep(0.3)


@contextlib.contextmanager
def chat_web_process(base, *args, key=None):
    """`python -m scripts.chat_web` on a free port with NANOCHAT_BASE_DIR=base; yields its URL."""
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": base, "OMP_NUM_THREADS": "1"}
    env.pop("NANOCHAT_API_KEY", None)
    cmd = [sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "--port", str(port), *args]
    proc = subprocess.Popen(cmd + (["--api-key", key] if key else []), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, key)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serve_in_thread(app):
    """The real uvicorn server on a free port, in a thread of this process (for apps built in the test)."""
    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
