"""
Chat with a trained model in the terminal. Replies stream token by token.

    python -m scripts.chat_cli                      # interactive, the latest SFT model
    python -m scripts.chat_cli --source mid -p "Why is the sky blue?"   # one reply, then exit

In the interactive loop, `clear` starts a new conversation and `quit` (or Ctrl-D) leaves.

`EngineChat` (the model + tokenizer behind a `stream(messages, ...)` method) is shared with
scripts.chat_web; a MegaContext session can stand in for it later with the same method, which is
how `--memory DIR` will plug in.
"""
import argparse
import random
import sys

from nanochat.common import UserError, autodetect_device_type, compute_init, run_main

REPLACEMENT_CHAR = "\ufffd"


class StreamDecoder:
    """
    Incremental detokenizer: byte-level BPE can split one UTF-8 character over several tokens, so
    decoding token by token would print garbage. Text is released only once it decodes cleanly
    (no trailing replacement character); `flush` releases whatever is left at the end.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.emitted = 0  # characters of decode(ids) already released

    def feed(self, token_id):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete multi-byte character: wait for the next token
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self):
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


class EngineChat:
    """A model + tokenizer that answers a conversation as a stream of text pieces."""

    def __init__(self, model, tokenizer):
        from nanochat.engine import Engine
        self.model = model
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer)
        self.stop_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def prompt_ids(self, messages):
        """Token ids that prime the model to answer `messages` (the last one is the user's)."""
        return self.tokenizer.render_for_completion({"messages": messages})

    def stream(self, messages, temperature=0.6, top_k=50, max_tokens=512, seed=None, prompt_ids=None):
        """Yield the reply to `messages` as text pieces, stopping at <|assistant_end|>."""
        ids = prompt_ids if prompt_ids is not None else self.prompt_ids(messages)
        seed = random.randint(0, 2**31 - 1) if seed is None else seed
        decoder = StreamDecoder(self.tokenizer)
        for column, _ in self.engine.generate(ids, num_samples=1, max_tokens=max_tokens,
                                              temperature=temperature, top_k=top_k or None, seed=seed):
            token = column[0]
            if token in self.stop_ids:
                break
            piece = decoder.feed(token)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest


def load_chat(source, model_tag=None, step=None, device_type=None):
    """Load a checkpoint (UserError if there is none) and wrap it for chatting."""
    from nanochat.checkpoint_manager import load_model
    _, _, _, _, device = compute_init(device_type or autodetect_device_type())
    model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=model_tag, step=step)
    return EngineChat(model, tokenizer), meta


def reply(chat, messages, out, prefix="Assistant: ", **gen_kwargs):
    """Stream one assistant reply to `out`; return its full text."""
    out.write(prefix)
    out.flush()
    pieces = []
    for piece in chat.stream(messages, **gen_kwargs):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(pieces)


def interactive(chat, gen_kwargs, inp=None, out=None):
    """The read-eval-print loop. Returns the conversation's messages (for tests)."""
    inp, out = inp or sys.stdin, out or sys.stdout
    out.write("Chat with the model. Type 'clear' to start over, 'quit' to leave.\n")
    messages = []
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
            messages = []
            out.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": reply(chat, messages, out, **gen_kwargs)})
    return messages


def build_parser():
    p = argparse.ArgumentParser(prog="python -m scripts.chat_cli",
                                description="Chat with a trained model in the terminal (streams tokens).")
    p.add_argument("--source", choices=["base", "mid", "sft"], default="sft",
                   help="which checkpoints to load (default: sft)")
    p.add_argument("--model-tag", default=None, help="model tag, e.g. d20 (default: the largest one)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("-p", "--prompt", default=None, help="ask one question, print the reply and exit")
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
    chat, _ = load_chat(args.source, args.model_tag, args.step, args.device_type)
    gen_kwargs = dict(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed)
    if args.prompt is not None:
        # just the reply, so `-p` composes with shell pipes
        reply(chat, [{"role": "user", "content": args.prompt}], sys.stdout, prefix="", **gen_kwargs)
    else:
        interactive(chat, gen_kwargs)


if __name__ == "__main__":
    run_main(main)
