"""
The focus map: what the page draws beside the chat. A snapshot of one conversation's working context
(the entries the GPT reads, in order, each with its level and token span, and the text of the raw ones)
and the counters around it. It is read from MCSession's public state (wc, K, tree, counters) by the
thread that holds the conversation's turn lock, so it never races a turn.

FocusHub keeps the latest snapshot of each conversation and wakes the event streams that follow it
(GET /v1/conversations/{id}/events). A slow reader skips to the newest map instead of queueing old ones.
"""
import asyncio
import threading

from megacontext.working_context import entry_spans


def snapshot(cid, chat):
    """The focus map of a MemoryChat as a JSON-able dict (type "focus")."""
    s = chat.session
    wc = s.wc
    starts, ends = entry_spans(wc, s.K)
    levels = wc.levels.tolist()
    entries, texts = [], []
    for level, a, b in zip(levels, starts.tolist(), ends.tolist()):
        entries.append([level, a, b])
        # raw blocks carry their text for the hover; a gist is a vector, it has none
        texts.append(s.tokenizer.decode(s.tree.tokens(a, b).tolist()) if level == 0 and s.tokenizer else None)
    st = s.stats()
    return {"type": "focus", "conversation_id": cid, "num_tokens": st["num_tokens"], "budget": st["budget"],
            "wc_cost": st["wc_cost"], "refocus_count": st["refocus_count"], "turns": chat.turns,
            "block_size": s.K, "max_level": s.cfg.max_level, "entries": entries, "texts": texts}


class Listener:
    def __init__(self, loop):
        self.loop = loop
        self.latest = None
        self.wake = asyncio.Event()

    def _set(self, event):
        self.latest = event
        self.wake.set()

    async def next(self, timeout):
        """The newest event since the last call, or None after `timeout` seconds without one."""
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        self.wake.clear()
        event, self.latest = self.latest, None
        return event


class FocusHub:
    def __init__(self):
        self.lock = threading.Lock()
        self.last = {}       # id -> the newest focus map
        self.listeners = {}  # id -> set of Listener

    def publish(self, cid, event):
        """From any thread: remember `event` (a focus map, or {"type": "deleted"}) and wake the listeners."""
        with self.lock:
            if event.get("type") == "focus":
                self.last[cid] = event
            else:
                self.last.pop(cid, None)
            listeners = list(self.listeners.get(cid, ()))
        for li in listeners:
            try:
                li.loop.call_soon_threadsafe(li._set, event)
            except RuntimeError:  # that listener's event loop is closed
                pass

    def latest(self, cid):
        with self.lock:
            return self.last.get(cid)

    def listen(self, cid):
        li = Listener(asyncio.get_running_loop())
        with self.lock:
            self.listeners.setdefault(cid, set()).add(li)
        return li

    def forget(self, cid, li):
        with self.lock:
            group = self.listeners.get(cid)
            if group is not None:
                group.discard(li)
                if not group:
                    del self.listeners[cid]
