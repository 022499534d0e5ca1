"""
The conversations' memories: one persistent MemoryChat (scripts/chat_cli.py) per conversation id, in
root/<id>, all built on the nets of one template session.

Each conversation has a record that lives as long as the server: its turn lock, held by whatever reads
or writes that memory (a chat turn, a document, a focus-map snapshot, a delete), so one conversation's
memory is never touched by two requests at once and never by another conversation's; and its MemoryChat
while open. At most `max_open` memories stay open; the least recently used idle ones are saved and
closed, and a closed one is reopened from disk on its next request.

Ids are validated (validation.CONVERSATION_ID) and every path is checked to resolve to a direct child of
root, so no user input reaches the filesystem unchecked.
"""
import os
import secrets
import shutil
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext

from nanochat.server.errors import APIError, not_found
from nanochat.server.validation import CONVERSATION_ID, conversation_id

SESSION_FILE = "session.json"  # what marks a directory as a memory (megacontext/memory_store.py)


class Record:
    def __init__(self, cid):
        self.id = cid
        self.turn = threading.Lock()
        self.chat = None  # the open MemoryChat, or None


class ConversationMemories:

    def __init__(self, template, root, max_open=16):
        self.template = template  # an MCSession whose GPT/GistNet/LensNet/config every memory uses
        self.root = os.path.abspath(root)
        self.max_open = max_open
        self.records = {}          # id -> Record, for every id seen since the start
        self.open = OrderedDict()  # ids with an open MemoryChat, least recently used first
        self.lock = threading.Lock()

    def path(self, cid):
        """root/<cid>, after checking the id and that the path resolves inside root (no symlink out)."""
        cid = conversation_id(cid, required=True)
        path = os.path.join(self.root, cid)
        if os.path.dirname(os.path.realpath(path)) != os.path.realpath(self.root):
            raise APIError(f"conversation {cid}: its directory is not inside the memory root", 400,
                           param="conversation_id")
        return path

    def exists(self, cid):
        return os.path.isfile(os.path.join(self.path(cid), SESSION_FILE))

    def _record(self, cid):
        with self.lock:
            return self.records.setdefault(cid, Record(cid))

    def list(self):
        """[{"id", "updated"}] of the memories on disk, the most recently updated first."""
        out = []
        if os.path.isdir(self.root):
            for e in os.scandir(self.root):
                marker = os.path.join(e.path, SESSION_FILE)
                if CONVERSATION_ID.fullmatch(e.name) and e.is_dir(follow_symlinks=False) and os.path.isfile(marker):
                    out.append({"id": e.name, "updated": int(os.path.getmtime(marker))})
        return sorted(out, key=lambda c: (-c["updated"], c["id"]))

    @contextmanager
    def use(self, cid, step_lock=None, create=True):
        """
        Hold conversation `cid` for a whole turn: its turn lock, then its MemoryChat (opened, or created
        when `create`, else 404); reopening happens under `step_lock`. Blocks while another request holds it.
        """
        from megacontext.runtime import SessionError
        from scripts.chat_cli import MemoryChat, fork_session
        path = self.path(cid)
        record = self._record(cid)
        with record.turn:
            if record.chat is None:
                if not create and not self.exists(cid):
                    raise not_found(f"no conversation {cid}", "conversation_not_found")
                os.makedirs(self.root, exist_ok=True)
                # reopening may run the nets (a memory not saved after its last tokens catches up); a new one does not
                reopen = os.path.exists(path)
                try:
                    with step_lock if reopen and step_lock is not None else nullcontext():
                        record.chat = MemoryChat(fork_session(self.template, path))
                except SessionError as e:  # e.g. a memory made by another model: the server's state, not the request
                    raise APIError(f"conversation {cid}: {e}", 409, code="memory_unusable") from None
            with self.lock:
                self.open[cid] = record
                self.open.move_to_end(cid)
            yield record.chat
        self._evict()

    def _evict(self):
        """Save and close the least recently used idle memories beyond max_open (an idle one's turn lock is free)."""
        while True:
            with self.lock:
                if len(self.open) <= self.max_open:
                    return
                victim = next((r for r in self.open.values() if r.turn.acquire(blocking=False)), None)
                if victim is None:
                    return  # every open memory is in use
                self.open.pop(victim.id)
            try:
                victim.chat.close()
                victim.chat = None
            finally:
                victim.turn.release()

    def create(self, cid=None, step_lock=None):
        """A new, empty memory (a fresh random id when cid is None); 409 when cid already exists."""
        cid = cid or secrets.token_hex(16)
        if self.exists(cid):
            raise APIError(f"conversation {cid} already exists", 409, param="id", code="conversation_exists")
        with self.use(cid, step_lock) as chat:
            return cid, chat.stats()

    def delete(self, cid):
        """Close and remove a memory from disk; 404 when there is none, 409 while a request is using it."""
        path = self.path(cid)
        if not self.exists(cid):
            raise not_found(f"no conversation {cid}", "conversation_not_found")
        record = self._record(cid)
        if not record.turn.acquire(blocking=False):
            raise APIError(f"conversation {cid} is answering a request; delete it when that is done", 409,
                           code="conversation_busy")
        try:
            with self.lock:
                self.open.pop(cid, None)
            if record.chat is not None:
                record.chat.close()
                record.chat = None
            shutil.rmtree(path)
        finally:
            record.turn.release()

    def ephemeral(self):
        """A fresh in-RAM MemoryChat (for a request without a conversation_id)."""
        from scripts.chat_cli import MemoryChat, fork_session
        return MemoryChat(fork_session(self.template))

    def close(self):
        """Save and close every open memory (at shutdown)."""
        with self.lock:
            records = list(self.open.values())
            self.open.clear()
        for r in records:
            with r.turn:
                if r.chat is not None:
                    r.chat.close()
                    r.chat = None
