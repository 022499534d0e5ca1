"""
bAbI-style stories (Weston et al. 2015, "Towards AI-Complete Question Answering"), the field's standard for
memory beyond the window once scattered through long text (BABILong). Our own generator and wording,
following bAbI's world rules: actors move between places ("Mary went to the kitchen."), pick up, drop and hand
over objects ("John picked up the football.", "Daniel gave the apple to Sandra."); every answer is one word.

- qa1, one supporting fact: "Where is Mary?" -> the place of her last move.
- qa2, two supporting facts: "Where is the football?" -> where its holder is now, or was when dropping it. The
  fact that answers ("John went to the kitchen.") shares no word with the question: the possession fact links them.
- qa3, three supporting facts: "Where was the football before the kitchen?" -> the place its carrier came from
  (the carrier's move there, the possession fact, the move into the kitchen).

A simulated World applies every fact and records which facts establish each state, so the answer is what the
story implies and the supporting facts are exactly those that imply it (tests/test_babi.py replays both).
Distractors: the other actors' moves, the other objects, and the asked actor's or object's earlier history.

A story is a tasks.longctx.Plan (StoryPlan): needles = the supporting facts, the answering one first, then the
others in story order; decoys = every other fact, in story order. It lays itself out (longctx.render_raw and
chat_view.render_chat hand it to StoryPlan.render_raw / render_chat): the facts keep their story order at
increasing depths of the history, the answering one at `depth` when given.

    plan = story_plan("qa2", rng, split="eval", n_facts=20)   # or make_plan("qa2", rng, "eval", n_facts=20)
    ex = raw_example("qa2", filler, tok, rng, n_tokens=8192, n_facts=20)   # needle_spans: the supporting facts
    chat = chat_example("qa3", filler, tok, rng, n_tokens=8192)            # facts as user turns, question last

Scoring (tasks/longctx.score_reply): the reply names the answer and no other place of the split (for qa3 the
question's own place may be echoed: "Before the kitchen it was in the hallway." is right).
"""
import dataclasses
from collections import namedtuple

import numpy as np

from tasks.longctx import STORY_TASKS, LongCtxExample, Plan, _assemble
from tasks.splits import BABI, check_split

MIN_FACTS = {"qa1": 1, "qa2": 2, "qa3": 3}              # its supporting facts
DEFAULT_FACTS = {"qa1": (2, 6), "qa2": (3, 6), "qa3": (4, 6)}  # a few: they fit a 700-character chat
MAX_TRIES = 2000
# how often each kind of fact is drawn: qa1 is mostly moves (as in bAbI), qa2 / qa3 need objects carried about
WEIGHTS = {"qa1": {"move": 8, "get": 1, "drop": 1, "give": 1},
           "qa2": {"move": 4, "get": 3, "drop": 2, "give": 2},
           "qa3": {"move": 5, "get": 3, "drop": 1, "give": 1}}

# one fact: kind "move" (item: a place), "get" / "drop" (item: an object), "give" (item: an object, other: receiver)
Event = namedtuple("Event", "kind actor item other", defaults=(None,))


# ------------------------------------------------------------------------------------------ the world
class World:
    """What the story says so far, with the story indices of the facts that say it."""

    def __init__(self):
        self.at = {}     # actor -> (place, index of the move that put them there)
        self.held = {}   # object -> (actor, index of the fact that gave it to them: a pick-up or a hand-over)
        self.lying = {}  # object -> (place, index of the drop, index of the dropper's move to that place)
        self.trail = {}  # object -> [(place, support)]: the places it has been, in order (consecutive ones differ)

    def legal(self, e):
        """bAbI's rules: move somewhere else; pick up an object where it is (anywhere, if nobody knows where it
        is); drop or hand over only what one holds, and hand over only to someone in the same place."""
        here = self.at.get(e.actor, (None,))[0]
        if e.kind == "move":
            return e.item != here
        if e.kind == "get":
            return here is not None and e.item not in self.held and self.lying.get(e.item, (here,))[0] == here
        holds = self.held.get(e.item, (None,))[0] == e.actor
        if e.kind == "drop":
            return holds
        return holds and e.other != e.actor and self.at.get(e.other, (None,))[0] == here  # give

    def apply(self, i, e):
        """Fact i happens."""
        if not self.legal(e):
            raise ValueError(f"fact {i} breaks the world's rules: {e}")
        if e.kind == "move":
            before = self.at.get(e.actor)
            self.at[e.actor] = (e.item, i)
            for o, (h, got) in self.held.items():  # what they carry comes along: (came from, possession, move)
                if h == e.actor:
                    self.trail[o].append((e.item, (before[1], got, i)))
        elif e.kind == "get":
            place, moved = self.at[e.actor]
            self.held[e.item] = (e.actor, i)
            self.lying.pop(e.item, None)
            self.trail.setdefault(e.item, [(place, (moved, i))])
        elif e.kind == "drop":
            place, moved = self.at[e.actor]
            del self.held[e.item]
            self.lying[e.item] = (place, i, moved)
        else:
            self.held[e.item] = (e.other, i)

    # --- questions: (answer, supporting fact indices, the answering one first) or None when the story cannot say
    def where_actor(self, a):
        if a not in self.at:
            return None
        place, moved = self.at[a]
        return place, [moved]

    def where_object(self, o):
        if o in self.held:
            holder, got = self.held[o]
            place, moved = self.at[holder]
            return place, [moved, got]
        if o in self.lying:
            place, dropped, moved = self.lying[o]
            return place, [moved, dropped]
        return None

    def before(self, o, p):
        """Where o was before p: asked only when o reached p once (else "before the kitchen" is ambiguous)."""
        places = [q for q, _ in self.trail.get(o, [])]
        if places.count(p) != 1 or places.index(p) == 0:
            return None
        k = places.index(p)
        came_from, got, moved = self.trail[o][k][1]  # the carrier's move to the place before, and into p
        return places[k - 1], [came_from, got, moved]


def legal_events(world, actors, places, objects):
    """Every fact that may happen next, by kind."""
    out = {"move": [Event("move", a, p) for a in actors for p in places if world.legal(Event("move", a, p))]}
    out["get"] = [Event("get", a, o) for a in actors for o in objects if world.legal(Event("get", a, o))]
    out["drop"] = [Event("drop", a, o) for a in actors for o in objects if world.legal(Event("drop", a, o))]
    out["give"] = [Event("give", a, o, b) for a in actors for o in objects for b in actors
                   if world.legal(Event("give", a, o, b))]
    return out


def random_story(rng, n_facts, actors, places, objects, weights):
    """n_facts legal facts drawn at random (kinds by weight, then uniformly); returns (events, world)."""
    world, events = World(), []
    while len(events) < n_facts:
        legal = legal_events(world, actors, places, objects)
        kinds = [k for k in weights if legal[k]]  # moves are always legal
        w = np.array([weights[k] for k in kinds], dtype=float)
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        e = legal[kind][int(rng.integers(len(legal[kind])))]
        world.apply(len(events), e)
        events.append(e)
    return events, world


def ask(task, world, actors, objects, places):
    """Every question the story answers: [(question args, answer, support)]."""
    if task == "qa1":
        found = [((a,), world.where_actor(a)) for a in actors]
    elif task == "qa2":
        found = [((o,), world.where_object(o)) for o in objects]
    else:
        found = [((o, p), world.before(o, p)) for o in objects for p in places]
    return [(args, ans, sup) for args, r in found if r is not None for ans, sup in [r]]


# ------------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class StoryPlan(Plan):
    """A Plan whose statements are a story: needles = the supporting facts (the answering one first), decoys =
    the other facts; both views keep the story's order."""
    story: list = None       # raw texts of every fact, in story order
    chat_story: list = None  # the same as the user states them
    support: list = None     # story indices of the supporting facts, the answering one first
    events: list = None      # the facts as Events (story order)
    asked: tuple = None      # the question's arguments: (actor,), (object,) or (object, place)

    def layout(self, rng, depth=None):
        """Increasing depths (fractions of the history) of the facts in story order, so the story keeps its
        order; the answering fact at `depth` when given, those before it in [0, depth), those after in [depth, 1]."""
        n = len(self.story)
        if depth is None:
            return np.sort(rng.random(n)).tolist()
        depth, k = min(max(float(depth), 0.0), 1.0), self.support[0]
        return (np.sort(rng.uniform(0, depth, k)).tolist() + [depth]
                + np.sort(rng.uniform(depth, 1, n - k - 1)).tolist())

    def render_raw(self, filler, tokenizer, rng, n_tokens, depth=None):
        """The raw view (tasks/longctx.render_raw): the facts in filler in story order (ties keep it: they go in
        list order), then the question and the answer. key_spans = the answer word inside the answering fact."""
        from tasks.chat_view import text_span
        ids, spans, q, ans = _assemble(filler, tokenizer, rng, n_tokens, self.story, self.question,
                                       " " + self.answer, self.layout(rng, depth))
        needles = [spans[i] for i in self.support]
        decoys = [s for i, s in enumerate(spans) if i not in self.support]
        return LongCtxExample(ids, ans, q, " " + self.answer, needle_spans=needles, decoy_spans=decoys,
                              key_spans=[text_span(tokenizer, ids, needles[0], self.answer)], plan=self)

    def render_chat(self, filler, tokenizer, rng, n_tokens, depth=None, paste_share=0.5):
        """The chat view (tasks/chat_view.render_chat): a plain Plan whose statements are the facts in story order
        at increasing depths is rendered (ties keep the order), then its turns are relabelled needle / decoy."""
        from tasks.chat_view import render_chat
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(Plan)}
        ordered = Plan(**{**base, "chat_needles": list(self.chat_story), "chat_decoys": [],
                          "depths": self.layout(rng, depth)})
        chat = render_chat(ordered, filler, tokenizer, rng, n_tokens, paste_share=paste_share)
        turns = chat.needle_turns  # one per fact, in story order
        chat.needle_turns = [turns[i] for i in self.support]
        chat.decoy_turns = [t for i, t in enumerate(turns) if i not in self.support]
        chat.plan = self
        return chat


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _draw(rng, spec, lo_min):
    """An int, or one drawn from an inclusive (lo, hi) range."""
    lo, hi = (spec, spec) if isinstance(spec, (int, np.integer)) else spec
    if not lo_min <= lo <= hi:
        raise ValueError(f"need {lo_min} <= lo <= hi, got {spec}")
    return int(rng.integers(lo, hi + 1))


def story_plan(task, rng, split="train", n_facts=None, n_actors=None, n_objects=None):
    """
    A story of n_facts facts (an int or an inclusive (lo, hi) range; default DEFAULT_FACTS[task]) among n_actors
    actors and n_objects objects (default: a few, more for longer stories) and the split's places, and one
    question the story answers (drawn uniformly among those it answers), as a StoryPlan.
    """
    if task not in STORY_TASKS:
        raise ValueError(f"unknown story task {task!r}: choose from {STORY_TASKS}")
    s = BABI[check_split(split)]
    n = _draw(rng, n_facts or DEFAULT_FACTS[task], MIN_FACTS[task])
    na = _draw(rng, n_actors or (2, min(len(s["actors"]), 2 + n // 4)), 1)
    lo = 0 if task == "qa1" else 1  # qa1 asks about people: objects are only distractors there
    no = _draw(rng, (lo, min(len(s["objects"]), 1 + n // 6)) if n_objects is None else n_objects, lo)
    if na > len(s["actors"]) or no > len(s["objects"]):
        raise ValueError(f"the {split} half has {len(s['actors'])} actors and {len(s['objects'])} objects")
    actors = [s["actors"][i] for i in rng.choice(len(s["actors"]), na, replace=False)]
    objects = [s["objects"][i] for i in rng.choice(len(s["objects"]), no, replace=False)]
    for _ in range(MAX_TRIES):  # a random story answers the question we need most of the time (qa3: ~1 in 10)
        events, world = random_story(rng, n, actors, s["places"], objects, WEIGHTS[task])
        found = ask(task, world, actors, objects, s["places"])
        if found:
            break
    else:
        raise ValueError(f"no {task} story of {n} facts among {na} actors and {no} objects answers a question")
    args, answer, support = found[int(rng.integers(len(found)))]
    support = support[:1] + sorted(support[1:])
    facts = [_pick(rng, s["facts"][e.kind]).format(a=e.actor, p=e.item, o=e.item, b=e.other) for e in events]
    story = [f" {f} " for f in facts]
    chat_story = [_pick(rng, s["lead_ins"]).format(s=f) for f in facts]
    fill = dict(zip(("a",), args)) if task == "qa1" else dict(zip(("o", "p"), args))
    raw_q, chat_q = _pick(rng, s["questions"][task])
    values = [p for p in s["places"] if task != "qa3" or p != args[1]]  # qa3: echoing the asked place is fine
    rest = [i for i in range(n) if i not in support]
    return StoryPlan(task, split, [story[i] for i in support], [story[i] for i in rest], raw_q.format(**fill), answer,
                     [chat_story[i] for i in support], [chat_story[i] for i in rest], chat_q.format(**fill),
                     s["replies"][task].format(**{**fill, "p": answer}), values,
                     story=story, chat_story=chat_story, support=support, events=events, asked=tuple(args))
