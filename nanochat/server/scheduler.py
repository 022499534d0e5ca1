"""
Many conversations at once. Each request's work runs in its own thread and takes the model for one
step at a time (a token, a chunk of a document) through a FairLock, so replies in different
conversations interleave token by token instead of waiting for each other's whole reply. Every
conversation has its own memory, KV cache and turn lock (conversations.py), so the only thing they
share is the nets, and only one step at a time uses them. A GPU would rather batch the steps; on this
scale interleaving is the simplest thing that keeps the first token quick for everyone.

At most `max_active` requests run at once; one more is answered 503 with Retry-After at once, rather
than queued behind an unbounded backlog.
"""
import asyncio
import logging
import threading

from nanochat.server.errors import APIError, busy

logger = logging.getLogger("nanochat")


class FairLock:
    """
    A lock granted in arrival order (a ticket lock). threading.Lock lets the thread that releases it take
    it straight back, so one decode loop would keep the model for its whole reply; this one hands it to
    the thread that has waited longest.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0     # the next ticket to hand out
        self._serving = 0  # the ticket that holds the lock

    def acquire(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def release(self):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def locked(self):
        with self._cond:
            return self._serving != self._next

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


END = object()


class Run:
    """
    work(emit, cancelled) running in a thread of its own; what it emits comes out of this async iterator,
    in order. An APIError or any other exception in the work comes out as ("error", APIError). cancel()
    asks the work to stop at its next step (the client went away).
    """

    def __init__(self, scheduler, work):
        self.loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.scheduler = scheduler
        threading.Thread(target=self._main, args=(work,), daemon=True, name="nanochat-turn").start()

    def _emit(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    def _main(self, work):
        try:
            work(self._emit, self.cancelled)
        except APIError as e:
            self._emit(("error", e))
        except Exception as e:  # reported to the client, and logged with its traceback
            logger.exception("request failed")
            self._emit(("error", APIError(f"generation failed: {type(e).__name__}: {e}", 500)))
        finally:
            self.scheduler.release()
            self._emit(END)

    def cancel(self):
        self.cancelled.set()

    async def started(self):
        """Wait for the work's first event ("ready": it passed its checks and holds what it needs) and return it;
        an error before that is raised here, so the route answers it as an HTTP error, not inside a stream."""
        try:
            first = await anext(self)
        except BaseException:
            self.cancel()
            raise
        if first[0] == "error":
            raise first[1]
        return first

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.queue.get()
        if item is END:
            raise StopAsyncIteration
        return item


class Scheduler:
    def __init__(self, max_active=8):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        self.model_lock = FairLock()
        self.max_active = max_active
        self.active = 0
        self._lock = threading.Lock()

    def start(self, work):
        """Run work(emit, cancelled) in a new thread and return its Run; 503 when max_active already run."""
        with self._lock:
            if self.active >= self.max_active:
                raise busy(f"the server is busy: {self.active} requests are being answered (its limit is "
                           f"{self.max_active}, --max-concurrent); try again in a moment")
            self.active += 1
        try:
            return Run(self, work)
        except BaseException:
            self.release()
            raise

    def release(self):
        with self._lock:
            self.active -= 1
