"""
The chat view of every long-context task (tasks/longctx.py): users reach the memory through chat, so a
task's plan also renders as a conversation. The user states the facts (one turn each, acknowledged by the
assistant), pastes long filler text ("Here is a chapter I'm reading: ...") and chats (small talk, quick sums)
until the history reaches the requested number of tokens; the question is the last user turn, and the reply
is scored strictly (tasks/longctx.score_reply). The chat filler comes from the plan's split, so the eval
half is held-out small talk (tasks/splits.py).

    chat = chat_example("passkey", filler, tokenizer, rng, n_tokens=4096, split="eval")
    chat.messages                      # [{"role": "user"|"assistant", "content": str}, ...], last: the question
    chat.score(reply_text)             # True / False
    ex = chat_to_raw(chat, tokenizer)  # the same conversation as token ids with the chat special tokens

History length: the tokens of BOS and every turn before the question, as the tokenizer's chat format renders
them (Tokenizer.render_turn; a tokenizer without chat special tokens counts 2 a turn for them). It never
exceeds n_tokens. With filler text it falls short by a few tokens (the last pasted text is cut to fit at a
space), or by less than one pasted-text exchange (~30 tokens) when the facts leave no room for one; with
small talk only (filler=None), by less than the shortest exchange.
"""
from dataclasses import dataclass

from tasks.longctx import LongCtxExample, make_plan, score_reply
from tasks.splits import CHAT

PASTE_TOKENS = (64, 1024)  # the range of one pasted text's length, in tokens
MIN_PASTE = 8              # the shortest pasted text worth a turn


@dataclass
class ChatExample:
    messages: list         # the conversation up to and including the question (the last user turn)
    reply: str             # the reference reply
    answer: str            # the asked value
    plan: object           # the tasks.longctx.Plan it renders
    needle_turns: list     # message indices of the needles' user turns (the asked one first)
    decoy_turns: list
    history_tokens: int    # tokens before the question's turn, as rendered

    def conversation(self):
        """A conversation with the reference reply (tokenizer.render_conversation, SFT)."""
        return {"messages": self.messages + [{"role": "assistant", "content": self.reply}]}

    def score(self, reply):
        return score_reply(self.plan, reply)


def turn_cost(tokenizer, role, content):
    """Tokens of one rendered turn: <|role_start|> content <|role_end|>."""
    if hasattr(tokenizer, "render_turn"):
        return len(tokenizer.render_turn(role, content))
    return len(tokenizer.encode(content)) + 2


def _pair_cost(tokenizer, user, assistant):
    return turn_cost(tokenizer, "user", user) + turn_cost(tokenizer, "assistant", assistant)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _small_talk(rng, split):
    """One (user, assistant) exchange of small talk or a quick sum."""
    c = CHAT[split]
    if rng.random() < 0.5:
        return _pick(rng, c["small_talk"])
    op = _pick(rng, "+-*")
    hi = 50 if op != "*" else 12
    a, b = int(rng.integers(0, hi + 1)), int(rng.integers(0, hi + 1))
    val = {"+": a + b, "-": a - b, "*": a * b}[op]
    return c["sum"][0].format(a=a, op=op, b=b), c["sum"][1].format(a=a, op=op, b=b, c=val)


def _take(filler, start, n):
    """n characters of filler from start, wrapping around to its beginning."""
    out = filler[start:start + n]
    while len(out) < n:
        out += " " + filler[:n - len(out) - 1]
    return out


def _passage(filler, tokenizer, rng, k):
    """About k tokens (never more) of filler text from a random sentence start, cut at a space."""
    start = int(rng.integers(0, len(filler)))
    nxt = [i for i in (filler.find(". ", start), filler.find("\n", start)) if 0 <= i < start + 400]
    start = min(nxt) + 1 if nxt else start
    cpt = 4.0  # characters per token, corrected by what the tokenizer says
    for _ in range(4):
        text = _take(filler, start, int(k * cpt * 1.25) + 64).strip()
        ids = tokenizer.encode(text)
        if len(ids) > k:
            break
        cpt *= 1.5 * k / max(len(ids), 1)
    if len(ids) > k:
        text = tokenizer.decode(ids[:k])
        text = text[:text.rfind(" ")] if " " in text else ""
    return text.strip()


def _filler_pairs(filler, tokenizer, rng, budget, split, paste_share):
    """(user, assistant) exchanges whose tokens sum to at most budget (and not much less): small talk,
    and pasted texts sized so that no gap too small for one is left at the end."""
    c = CHAT[split]
    reserve = (max(turn_cost(tokenizer, "user", i + "\n\n") for i in c["paste_intros"])
               + max(turn_cost(tokenizer, "assistant", r) for r in c["paste_replies"]) + MIN_PASTE)
    pairs, costs, misses = [], [], 0
    while budget > 0:
        if not filler or rng.random() >= paste_share:
            pair = _small_talk(rng, split)
            cost = _pair_cost(tokenizer, *pair)
            if cost <= budget - (reserve if filler else 0):  # room left for a closing paste
                pairs.append(pair)
                costs.append(cost)
                budget -= cost
                continue
            if not filler:  # small talk only: a few more draws for one short enough to close the gap
                misses += 1
                if misses > 20:
                    break
                continue
        if budget < reserve:
            break
        intro, ack = _pick(rng, c["paste_intros"]), _pick(rng, c["paste_replies"])
        overhead = _pair_cost(tokenizer, intro + "\n\n", ack)
        k = min(int(rng.integers(PASTE_TOKENS[0], PASTE_TOKENS[1] + 1)), budget - overhead)
        if budget - overhead - k < reserve:  # what would be left cannot hold another paste: fill it now
            k = budget - overhead
        text = _passage(filler, tokenizer, rng, k)
        while text and _pair_cost(tokenizer, f"{intro}\n\n{text}", ack) > budget:  # merges across the seam
            text = text[:text.rfind(" ")] if " " in text else ""
        if not text:
            break
        pair = (f"{intro}\n\n{text}", ack)
        pairs.append(pair)
        costs.append(_pair_cost(tokenizer, *pair))
        budget -= costs[-1]
    return pairs, costs


def render_chat(plan, filler, tokenizer, rng, n_tokens, depth=None, paste_share=0.5):
    """
    The plan as a conversation with ~n_tokens of history (at most n_tokens). The statements go at depths
    (fractions of the filler's tokens: `depth` for the asked one, else the plan's, else random), each as a
    user turn the assistant acknowledges. filler: the text the user pastes (None: small talk only).
    """
    if hasattr(plan, "render_chat"):  # a plan that lays itself out (tasks/babi.py: a story keeps its order)
        return plan.render_chat(filler, tokenizer, rng, n_tokens, depth=depth, paste_share=paste_share)
    split = plan.split
    acks = CHAT[split]["acks"]
    facts = [(t, _pick(rng, acks)) for t in plan.chat_needles + plan.chat_decoys]
    fact_costs = [_pair_cost(tokenizer, *p) for p in facts]
    budget = n_tokens - 1 - sum(fact_costs)  # 1: BOS
    if budget < 0:
        raise ValueError(f"history of {n_tokens} tokens is too short for {len(facts)} facts "
                         f"({sum(fact_costs) + 1} tokens)")
    pairs, costs = _filler_pairs(filler, tokenizer, rng, budget, split, paste_share)
    depths = list(plan.depths or [None] * len(facts))
    if depth is not None:
        depths[0] = depth
    # each statement goes to the exchange boundary nearest its depth (boundaries: token offsets of the filler)
    bounds, total = [0], 0
    for c in costs:
        total += c
        bounds.append(total)
    slots = []
    for d in depths:
        d = float(rng.random()) if d is None else min(max(float(d), 0.0), 1.0)
        slots.append(min(range(len(bounds)), key=lambda i: abs(bounds[i] - d * total)))
    order = sorted(range(len(facts)), key=lambda f: (slots[f], f))
    messages, turn_of, at = [], {}, 0

    def add(user, assistant):
        messages.extend([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])

    for i, pair in enumerate(pairs + [None]):
        while at < len(order) and slots[order[at]] == i:
            turn_of[order[at]] = len(messages)
            add(*facts[order[at]])
            at += 1
        if pair is not None:
            add(*pair)
    messages.append({"role": "user", "content": plan.chat_question})
    n = len(plan.chat_needles)
    return ChatExample(messages, plan.reply, plan.answer, plan, [turn_of[f] for f in range(n)],
                       [turn_of[f] for f in range(n, len(facts))], 1 + sum(fact_costs) + sum(costs))


def chat_example(task, filler, tokenizer, rng, n_tokens, split="train", depth=None, paste_share=0.5, **kwargs):
    """The chat view of one example of `task` (kwargs go to its plan builder)."""
    plan = make_plan(task, rng, split, **kwargs)
    return render_chat(plan, filler, tokenizer, rng, n_tokens, depth=depth, paste_share=paste_share)


# ------------------------------------------------------------------------------------------ token ids
def render_messages(messages, tokenizer):
    """
    Token ids of a conversation in the chat format (tokenizer with the chat special tokens): BOS, then every
    turn (Tokenizer.render_turn: the same ids as render_conversation), then <|assistant_start|> when the last
    turn is the user's, priming the reply. Returns (ids, spans): spans[i] = the token span of message i's text.
    """
    ids, spans = [tokenizer.get_bos_token_id()], []
    for m in messages:
        turn = tokenizer.render_turn(m["role"], m["content"])
        spans.append((len(ids) + 1, len(ids) + len(turn) - 1))
        ids += turn
    if messages and messages[-1]["role"] == "user":
        ids.append(tokenizer.encode_special("<|assistant_start|>"))
    return ids, spans


def text_span(tokenizer, ids, span, text):
    """The token span of the last occurrence of `text` inside ids[span]: the shortest suffix that holds it gives
    its first token, the shortest window from there its last (a value ends its statement)."""
    a, b = span
    i = next((i for i in range(b - 1, a - 1, -1) if text in tokenizer.decode(ids[i:b])), None)
    if i is None:
        raise ValueError(f"{text!r} is not inside the tokens {span}")
    return i, next(j for j in range(i + 1, b + 1) if text in tokenizer.decode(ids[i:j]))


def chat_to_raw(chat, tokenizer):
    """
    The raw view of a chat: the conversation as token ids (render_messages), priming the reply; the answer is
    the reference reply, ids[a:b] its tokens and <|assistant_end|>. question_start = the question's
    <|user_start|>; needle/decoy spans = the statements' texts; key_spans = the asked value's tokens.
    """
    ids, spans = render_messages(chat.messages, tokenizer)
    q = spans[-1][0] - 1
    a = len(ids)
    ids += list(tokenizer.encode(chat.reply)) + [tokenizer.encode_special("<|assistant_end|>")]
    needles = [spans[i] for i in chat.needle_turns]
    return LongCtxExample(ids, (a, len(ids)), q, chat.reply, needle_spans=needles,
                          decoy_spans=[spans[i] for i in chat.decoy_turns],
                          key_spans=[text_span(tokenizer, ids, needles[0], chat.answer)], plan=chat.plan)
