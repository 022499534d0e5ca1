"""
Chat with a trained model in the terminal. Replies stream token by token.

    python -m scripts.chat_cli                      # interactive, the latest SFT model
    python -m scripts.chat_cli --source mid -p "Why is the sky blue?"   # one reply, then exit
    python -m scripts.chat_cli --memory ~/mem       # a conversation that persists across runs
    python -m scripts.chat_cli --memory ~/mem --ingest book.txt -p "Who wrote the letter?"

In the interactive loop: `/ingest FILE [question]` reads a document into the conversation (then asks the
question, if any), `/stats` shows the memory, `clear` starts over, `quit` (or Ctrl-D) leaves. A document
goes in as a user turn that pastes it and an assistant turn that acknowledges it (`ingest_document`, the
same code as the web server's document upload), so the next question is answered from the memory.

Two chat objects share one interface, `prompt_ids(messages)` and `stream(messages, ...)`, and
scripts.chat_web serves either:
- `EngineChat`: a plain GPT. A conversation longer than the model's window keeps its most recent
  tokens (with a one-line notice), because the model has no memory beyond the window.
- `MemoryChat`: a MegaContext session (checkpoints trained with --mc). The conversation lives in
  the session's memory (tree + working context), so it can grow far past the window; with
  `--memory DIR` that memory is on disk and a later run continues it.
"""
import argparse
import contextlib
import json
import os
import random
import shlex
import sys
import threading

from nanochat.common import UserError, autodetect_device_type, compute_init, run_main

class EngineChat:
    """A model + tokenizer that answers a conversation as a stream of text pieces."""
    persistent = False

    def __init__(self, model, tokenizer):
        from nanochat.engine import Engine
        from nanochat.tokenizer import chat_stop_ids
        self.model = model
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer)
        self.stop_ids = chat_stop_ids(tokenizer)

    def prompt_ids(self, messages):
        """Token ids that prime the model to answer `messages` (the last one is the user's)."""
        return self.tokenizer.render_for_completion({"messages": messages})

    def fit_window(self, ids, max_tokens):
        """
        (ids, notice): the prompt cut to the model's window. Room is left for the reply (up to half
        the window); what is cut is the oldest part, BOS kept. notice is None when nothing was cut.
        """
        window = self.model.config.sequence_len
        room = window - min(max_tokens, window // 2)
        if len(ids) <= room:
            return ids, None
        kept = ids[:1] + ids[len(ids) - (room - 1):]
        return kept, (f"note: the conversation is {len(ids)} tokens, longer than the model's {window}-token "
                      f"window; keeping the most recent {room} (this checkpoint has no MegaContext memory)")

    def stream(self, messages, temperature=0.6, top_k=50, max_tokens=512, seed=None, prompt_ids=None,
               on_notice=None, progress=False):
        """Yield the reply to `messages` as text pieces, stopping at <|assistant_end|>.
        on_notice(str) hears about a prompt cut to the window; progress is unused (no memory to fill)."""
        ids = prompt_ids if prompt_ids is not None else self.prompt_ids(messages)
        ids, notice = self.fit_window(ids, max_tokens)
        if notice and on_notice is not None:
            on_notice(notice)
        seed = random.randint(0, 2**31 - 1) if seed is None else seed
        from nanochat.tokenizer import decode_stream
        columns = self.engine.generate(ids, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                       top_k=top_k or None, seed=seed)
        yield from decode_stream(self.tokenizer, (column[0] for column, _ in columns), self.stop_ids)

    def close(self):
        pass


def normalize_messages(messages):
    """Merge a leading system message into the first user message (as the chat format does) and check
    that turns alternate user/assistant, start with the user, end with the user, and are not empty."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = messages[1:]
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {i} has role {m['role']!r}, expected {expected!r} "
                             "(turns must alternate user/assistant, starting with user)")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"message {i} is empty")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be from the user")
    return messages


def fork_session(template, memory_dir=None):
    """A new MCSession over the same nets and config as `template` (in RAM, or persistent in memory_dir)."""
    from megacontext.runtime import MCSession
    t = template
    return MCSession(t.gpt, t.gistnet, t.lensnet, t.tokenizer, t.cfg, memory_dir=memory_dir, device=t.device,
                     source_info=t.source_info, reranker=t.reranker)


class MemoryChat:
    """
    A MegaContext session behind EngineChat's interface. The session's memory *is* the conversation:
    each request renders only the messages the memory has not seen yet (the client may send the whole
    transcript or just the new message), then the reply streams out of the session and into memory.
    `turns` counts the messages in memory (user_start + assistant_start tokens in the tree), so it
    survives restarts without extra state. One `lock` serialises every use of the session.
    """

    def __init__(self, session):
        self.session = session
        self.tokenizer = tok = session.tokenizer
        self.lock = threading.Lock()
        self.persistent = session.memory_dir is not None
        self.closed = False
        sp = tok.encode_special
        self.user_start = sp("<|user_start|>")
        self.assistant_start, self.assistant_end = sp("<|assistant_start|>"), sp("<|assistant_end|>")
        self.turns = self._count_turns()

    def _count_turns(self):
        tree, n, step, count = self.session.tree, self.session.num_tokens, 1 << 20, 0
        for a in range(0, n, step):  # chunked: a long memory is read a slice at a time
            t = tree.tokens(a, min(n, a + step))
            count += int(((t == self.user_start) | (t == self.assistant_start)).sum())
        return count

    def _pending(self, messages):
        """The messages the memory has not seen: the transcript past `turns`, else the last message."""
        messages = normalize_messages(messages)
        return messages[self.turns:] if len(messages) > self.turns else messages[-1:]

    def _render(self, pending):
        tok = self.tokenizer
        ids = [tok.get_bos_token_id()] if self.session.num_tokens == 0 else []
        for m in pending:
            ids += tok.render_turn(m["role"], m["content"])
        return ids + [self.assistant_start]

    def prompt_ids(self, messages):
        """Token ids this request adds to the memory (the unseen messages, then <|assistant_start|>)."""
        return self._render(self._pending(messages))

    def stream(self, messages, temperature=0.6, top_k=50, max_tokens=512, seed=None, prompt_ids=None,
               on_notice=None, progress=False):
        """
        Render the unseen messages into memory (a progress bar when `progress` and the text is long),
        then yield the reply's text. The assistant turn is closed and the memory saved even when the
        consumer stops early. prompt_ids is ignored: what is unseen is decided under the lock.
        """
        with self.lock:
            if self.closed:
                from megacontext.runtime import SessionError
                raise SessionError("this conversation's memory was closed")
            s = self.session
            pending = self._pending(messages)
            ids = self._render(pending)
            s.ingest(ids[:-1], progress=progress)
            self.turns += len(pending)
            seed = random.randint(0, 2**31 - 1) if seed is None else seed
            try:
                # the last token goes in through stream(), which refocuses so LensNet sees the question
                yield from s.stream(ids[-1:], max_tokens, temperature, top_k or None, seed)
            finally:
                n = s.num_tokens
                if s.tree.tokens(n - 1, n).item() != self.assistant_end:
                    s.ingest([self.assistant_end])  # cut by max_tokens or by the client: close the turn
                self.turns += 1
                if self.persistent:
                    s.save()

    def add_messages(self, messages, on_progress=None, step_lock=None, chunk_tokens=8192):
        """
        Render finished messages (a document and its acknowledgement) into memory without a reply, in
        chunks of about `chunk_tokens` (more than the budget, so each is appended in one batched call).
        Each chunk runs under `step_lock` (a server lets other conversations step in between) and is
        followed by on_progress(tokens_done, tokens_total). Returns the number of tokens added.
        """
        with self.lock:
            if self.closed:
                from megacontext.runtime import SessionError
                raise SessionError("this conversation's memory was closed")
            s, tok = self.session, self.tokenizer
            ids = [tok.get_bos_token_id()] if s.num_tokens == 0 else []
            for m in messages:
                ids += tok.render_turn(m["role"], m["content"])
            n = len(ids)
            # floor, so every chunk holds at least `chunk` tokens (a chunk within the budget would be
            # appended a block at a time with a refocus after each)
            chunks = max(1, n // max(chunk_tokens, s.cfg.budget + 1))
            bounds = [n * i // chunks for i in range(chunks + 1)]
            if on_progress is not None:
                on_progress(0, n)
            for a, b in zip(bounds, bounds[1:]):
                with step_lock or contextlib.nullcontext():
                    s.ingest(ids[a:b])
                if on_progress is not None:
                    on_progress(b, n)
            self.turns += len(messages)
            if self.persistent:
                s.save()
            return n

    def stats(self):
        return dict(self.session.stats(), turns=self.turns, memory_dir=self.session.memory_dir)

    def reset(self):
        """Start over with an empty in-RAM memory (a persistent memory is never wiped from here)."""
        if self.persistent:
            raise UserError("this conversation lives in a persistent memory; use a new --memory directory")
        with self.lock:
            self.session = fork_session(self.session)
            self.turns = 0

    def close(self):
        """Save (when persistent) and release the memory's files. Safe to call twice."""
        with self.lock:
            if self.closed:
                return
            if self.persistent:
                self.session.save()
            self.session.close()
            self.closed = True


def checkpoint_has_mc(source, model_tag=None, step=None):
    """Whether a checkpoint's meta names an MCConfig (read without loading the weights)."""
    from nanochat.checkpoint_manager import checkpoint_dir_for, find_last_step
    try:
        ckdir = checkpoint_dir_for(source, model_tag)
        step = find_last_step(ckdir) if step is None else step
        with open(os.path.join(ckdir, f"meta_{step:06d}.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("mc_config"))
    except (UserError, OSError, ValueError):
        return False  # load_model reports what is missing, with its usual message


def load_chat(source="sft", model_tag=None, step=None, device_type=None, memory_dir=None):
    """
    Load a checkpoint (UserError if there is none) and wrap it for chatting: a MemoryChat when it has
    MegaContext weights (persistent in memory_dir, else in RAM), else an EngineChat. With memory_dir
    holding a saved memory and source None, the checkpoint the memory recorded is used.
    Returns (chat, meta) where meta is the checkpoint's meta (EngineChat) or the session's source info.
    """
    from nanochat.checkpoint_manager import load_model
    from megacontext.memory_store import recorded_source
    from megacontext.runtime import MCSession
    _, _, _, _, device = compute_init(device_type or autodetect_device_type())
    if memory_dir is not None:
        memory_dir = os.path.abspath(os.path.expanduser(memory_dir))
        if os.path.exists(memory_dir) and not os.path.isdir(memory_dir):
            raise UserError(f"--memory {memory_dir} is a file, not a directory")
        if source is None and recorded_source(memory_dir):
            session = MCSession.open(memory_dir, model_tag=model_tag, step=step, device=device)
        else:
            session = MCSession.load(source or "sft", model_tag, step, device, memory_dir=memory_dir)
        return MemoryChat(session), session.source_info
    source = source or "sft"
    if checkpoint_has_mc(source, model_tag, step):
        session = MCSession.load(source, model_tag, step, device)
        return MemoryChat(session), session.source_info
    model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=model_tag, step=step)
    return EngineChat(model, tokenizer), meta


def reply(chat, messages, out, prefix="Assistant: ", notice_out=None, progress=False, **gen_kwargs):
    """Stream one assistant reply to `out` (notices to `notice_out`, default `out`); return its text."""
    notice_out = notice_out or out

    def on_notice(text):
        notice_out.write(text + "\n")
        notice_out.flush()
    pieces = []
    stream = chat.stream(messages, on_notice=on_notice, progress=progress, **gen_kwargs)
    try:
        first = True
        for piece in stream:
            if first:  # the prefix after any notice or progress bar, so they do not interleave
                out.write(prefix)
                first = False
            pieces.append(piece)
            out.write(piece)
            out.flush()
        if first:
            out.write(prefix)
    finally:
        if hasattr(stream, "close"):
            stream.close()  # Ctrl-C mid-reply: a memory still closes the turn and saves
    out.write("\n")
    out.flush()
    return "".join(pieces)


def read_document(path):
    """The text of a file to ingest; UserError if it cannot be read or is empty."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise UserError(f"{path} is empty: nothing to ingest")
    return text


# A document enters the conversation as the user pasting it and the assistant acknowledging it, in the
# shape midtraining's pasted-text turns have (tasks/chat_view.py); the question comes as the next turn.
DOC_INTRO = "Here is a document"
DOC_ACK = "I've read it through."


def document_messages(text, name=None):
    """The two chat messages a document becomes: the user pasting it, the assistant acknowledging it."""
    intro = f"{DOC_INTRO}, {name}:" if name else f"{DOC_INTRO}:"
    return [{"role": "user", "content": intro + "\n\n" + text.strip()}, {"role": "assistant", "content": DOC_ACK}]


def ingest_document(chat, text, name=None, on_progress=None, step_lock=None, chunk_tokens=8192):
    """
    Read a document into a conversation: the CLI's /ingest and --ingest and the server's document route
    (POST /v1/conversations/{id}/documents) all come here. A MemoryChat renders it into its memory now
    (on_progress(done, total) in tokens, chunks under step_lock: MemoryChat.add_messages); a plain chat
    has no memory, and reads it from the transcript. Returns the messages to append to the transcript.
    """
    if not text.strip():
        raise UserError("the document is empty: nothing to ingest")
    messages = document_messages(text, name)
    if hasattr(chat, "add_messages"):
        chat.add_messages(messages, on_progress=on_progress, step_lock=step_lock, chunk_tokens=chunk_tokens)
    return messages


def progress_bar(out=None):
    """An on_progress callback for ingest_document that draws a tqdm bar (closed when it reaches the total)."""
    from tqdm import tqdm
    bar = None

    def update(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="ingest", unit="tok", unit_scale=True, file=out or sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return update


def format_stats(chat):
    if not hasattr(chat, "stats"):
        return "(no MegaContext memory: this checkpoint has no MegaContext weights)"
    return "stats: " + json.dumps(chat.stats())


HELP = ("Commands: /ingest FILE [question]  read a document into the conversation, then ask the question;\n"
        "          /stats  memory statistics;  clear  start over;  quit  leave.\n")


def interactive(chat, gen_kwargs, inp=None, out=None, ingest=None):
    """The read-eval-print loop. `ingest`: a file read in before the first question. Returns the messages."""
    inp, out = inp or sys.stdin, out or sys.stdout
    where = f" Memory: {chat.session.memory_dir}." if getattr(chat, "persistent", False) else ""
    out.write(f"Chat with the model. Type 'clear' to start over, 'quit' to leave, '/help' for commands.{where}\n")
    messages = []

    def turn(content, progress=False):
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": reply(chat, messages, out, progress=progress, **gen_kwargs)})

    def read_in(path, text):
        messages.extend(ingest_document(chat, text, os.path.basename(path), on_progress=progress_bar()))
        out.write(f"(read {path} into the conversation)\n")

    if ingest is not None:
        read_in(ingest, read_document(ingest))
    while True:
        out.write("\nUser: ")
        out.flush()
        line = inp.readline()
        if not line:  # EOF (Ctrl-D)
            out.write("\n")
            break
        text = line.strip()
        if text.lower() in ("quit", "exit"):
            break
        if text.lower() == "clear":
            if getattr(chat, "persistent", False):
                out.write("(this conversation lives in a persistent memory; start a new one with another "
                          "--memory directory)\n")
                continue
            if hasattr(chat, "reset"):
                chat.reset()
            messages = []
            out.write("(conversation cleared)\n")
            continue
        if text in ("/help", "/?"):
            out.write(HELP)
            continue
        if text == "/stats":
            out.write(format_stats(chat) + "\n")
            continue
        if text == "/ingest" or text.startswith("/ingest "):
            try:
                parts = shlex.split(text[len("/ingest"):])
                if not parts:
                    raise UserError("usage: /ingest FILE [question]")
                doc = read_document(parts[0])
            except (UserError, ValueError) as e:
                out.write(f"error: {e}\n")
                continue
            read_in(parts[0], doc)
            question = " ".join(parts[1:])
            if question:
                turn(question)
            continue
        if not text:
            continue
        turn(text)
    return messages


def build_parser():
    p = argparse.ArgumentParser(prog="python -m scripts.chat_cli",
                                description="Chat with a trained model in the terminal (streams tokens).")
    p.add_argument("--source", choices=["base", "mid", "sft"], default=None,
                   help="which checkpoints to load (default: sft, or the one a saved --memory recorded)")
    p.add_argument("--model-tag", default=None, help="model tag, e.g. d20 (default: the largest one)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("-p", "--prompt", default=None, help="ask one question, print the reply and exit")
    p.add_argument("--memory", metavar="DIR", default=None,
                   help="keep the conversation in a persistent MegaContext memory in DIR (created if missing, "
                        "continued if present); needs a checkpoint trained with --mc")
    p.add_argument("--ingest", metavar="FILE", default=None,
                   help="read a document into the conversation first (with -p: the document, then the question)")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy (default: 0.6)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all (default: 50)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (default: 512)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one per reply)")
    p.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("-p/--prompt is empty")
    doc = read_document(args.ingest) if args.ingest else None  # before the (slow) model load
    chat, _ = load_chat(args.source, args.model_tag, args.step, args.device_type, memory_dir=args.memory)
    gen_kwargs = dict(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed)
    try:
        if args.prompt is not None:
            messages = [] if doc is None else ingest_document(chat, doc, os.path.basename(args.ingest),
                                                              on_progress=progress_bar())
            # just the reply on stdout, so `-p` composes with shell pipes; notices go to stderr
            reply(chat, messages + [{"role": "user", "content": args.prompt}], sys.stdout, prefix="",
                  notice_out=sys.stderr, **gen_kwargs)
        else:
            interactive(chat, gen_kwargs, ingest=args.ingest)
    finally:
        chat.close()  # a persistent memory is saved on exit (it was also saved after every turn)


if __name__ == "__main__":
    run_main(main)
