"""
The two halves of every synthetic long-context task: midtraining draws split="train", the evaluation
split="eval", and the halves share nothing a model could memorise, so the evaluation measures memory that
generalises, not the training templates. Disjoint by construction (tests/test_splits.py checks it):

- needle sentences, decoy sentences and question wordings (raw and chat forms) of passkey, multikey and
  kv_recall (tasks/longctx.py);
- the labels: multikey colours, kv-recall words;
- the chat-memory facts (tasks/memory.py, tasks/longctx.chat_memory): how a fact is stated and asked,
  its values, the decoys' owners;
- the chat filler (tasks/chat_view.py): small talk, acknowledgements, the lines around pasted text, sums;
- the bAbI-style stories (tasks/babi.py): actors, places, objects, how each kind of fact is worded ("went to"
  in training, "travelled to" in evaluation), the questions, the replies and the chat lead-ins;
- the keys' values (below). The filler TEXT is the caller's: pretraining text for training, the held-out
  corpus (nanochat.dataset.load_heldout_text) for evaluation.

Shared on purpose, because they are the answer's format and not what is remembered: the answer prefixes
that end a raw question ("The pass key is", "The {c} key is", "{k} ->") and the chat replies of passkey,
multikey and kv_recall, which are those prefixes followed by the value.

Keys: the same shape in both halves (5 digits, any digit in any place), so the evaluation measures memory
and not format; disjoint values by digit-sum parity: a train key's digits sum to an even number, an eval
key's to an odd one. Parity belongs to the whole key: no digit, position or token (keys are tokenized two
digits at a time) tells the halves apart, and each half is exactly half of 00000-99999.
"""
import functools
import random
from collections import namedtuple

SPLITS = ("train", "eval")


def check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def key_parity(split):
    """The digit-sum parity of the split's keys: 0 (even) for train, 1 (odd) for eval."""
    return SPLITS.index(check_split(split))


def key_split(key):
    """Which half a digit string belongs to."""
    return SPLITS[sum(int(d) for d in key) % 2]


# --------------------------------------------------------------------------- passkey
# questions: (raw: the text after the history, ending where the key starts; chat: the user's last turn)
PASSKEY = {
    "train": {
        "needles": [
            " The pass key is {key}. Remember it. ",
            " Remember this: the pass key is {key}. ",
            " Note that the secret pass key is {key}. ",
            " By the way, the pass key is {key}. ",
            " The pass key = {key}. ",
            " Your pass key was set to {key}. ",
            " The pass key, {key}, must be kept safe. ",
            " The new pass key will be {key} from now on. ",
            " Use the pass key {key} at the gate. ",
            " The pass key equals {key}. ",
        ],
        "questions": [
            ("\nWhat is the pass key? The pass key is", "What is the pass key?"),
            ("\nQuestion: what was the pass key mentioned above? The pass key is",
             "Question: what was the pass key I mentioned?"),
            ("\nRecall the secret number. The pass key is", "Recall the secret number: the pass key."),
            ("\nWhat pass key appeared in the text? The pass key is", "What pass key appeared in our chat?"),
            ("\nPlease repeat the pass key. The pass key is", "Please repeat the pass key."),
            ("\nWhat did the text say the pass key was? The pass key is", "What did I say the pass key was?"),
            ("\nDo you remember the pass key? The pass key is", "Do you remember the pass key I told you?"),
        ],
    },
    "eval": {
        "needles": [
            " Keep this in mind: the pass key is {key}. ",
            " Here is the pass key: {key}. Do not lose it. ",
            " The pass key you will need is {key}. ",
            " Write this down, the pass key is {key}. ",
        ],
        "questions": [
            ("\nWhich pass key was given earlier? The pass key is", "Which pass key did I give you earlier?"),
            ("\nName the pass key from the text. The pass key is", "Can you tell me that pass key again?"),
            ("\nI need the pass key now. The pass key is", "Remind me of the pass key, please."),
        ],
    },
}
PASSKEY_REPLY = "The pass key is {v}."

# --------------------------------------------------------------------------- multikey
# decoys use the ASKED label with another noun: only reading the question and the needle together answers
MULTIKEY = {
    "train": {
        "labels": ["red", "blue", "green", "gold", "gray", "pink", "teal", "navy", "lime", "rose"],
        "needles": [" The {c} key is {key}. ", " Note: the {c} key is {key}. ", " The {c} key = {key}. ",
                    " The {c} key was set to {key}. ", " The {c} key, {key}, is new. ", " The {c} key equals {key}. "],
        "decoys": [" The {c} code is {key}. ", " A {c} lock was {key}. ", " The {c} door is {key}. ",
                   " The {c} card = {key}. ", " The {c} gate was set to {key}. ", " The {c} code equals {key}. "],
        "questions": [
            ("\nWhat is the {c} key? The {c} key is", "What is the {c} key?"),
            ("\nGive the {c} key from above. The {c} key is", "Give me the {c} key from above."),
            ("\nWhat did the text say the {c} key was? The {c} key is", "What did I say the {c} key was?"),
            ("\nQuestion: which number is the {c} key? The {c} key is", "Which number is the {c} key?"),
            ("\nRecall the number given for the {c} key. The {c} key is", "Recall the number given for the {c} key."),
        ],
    },
    "eval": {
        "labels": ["violet", "olive", "maroon", "beige", "cyan", "tan", "plum", "mint", "rust", "khaki"],
        "needles": [" The {c} key reads {key}. ", " Here is the {c} key: {key}. "],
        "decoys": [" The {c} box holds {key}. ", " A {c} ticket says {key}. ", " The {c} badge shows {key}. "],
        "questions": [  # the first two are the held-out wording mc_eval has asked with since before the split
            ("\nTell me the {c} key from the text above. The {c} key is", "Tell me the {c} key from before."),
            ("\nWhich value did the {c} key have? The {c} key is", "Which value did the {c} key have?"),
            ("\nWhat number went with the {c} key? The {c} key is", "What number went with the {c} key?"),
        ],
    },
}
MULTIKEY_REPLY = "The {c} key is {v}."

# --------------------------------------------------------------------------- kv_recall
KV = {
    "train": {
        "labels": ["apple", "river", "stone", "cloud", "maple", "tiger", "ember", "frost", "pearl", "cedar", "quill",
                   "amber", "delta", "lotus", "raven", "sable", "coral", "ivory", "onyx", "willow"],
        "needles": [" Record: {k} -> {v}. ", " Stored: {k} -> {v}. ", " Saved {k} -> {v}. ", " Item {k} -> {v}. "],
        "questions": [("\nLook up the record. {k} ->", "Look up the record for {k}."),
                      ("\nCheck the records. {k} ->", "Check the records for {k}.")],
    },
    "eval": {
        "labels": ["badger", "canyon", "meadow", "harbor", "lantern", "falcon", "orchid", "pebble", "thistle",
                   "walnut", "cobalt", "juniper", "marble", "nectar", "saddle", "tundra", "velvet", "zephyr",
                   "basil", "comet"],
        "needles": [" Entry: {k} -> {v}. ", " Logged: {k} -> {v}. "],
        "questions": [("\nFind the entry. {k} ->", "Find the entry for {k}."),
                      ("\nSearch the log. {k} ->", "What is logged under {k}?")],
    },
}
KV_REPLY = "{k} -> {v}."

# --------------------------------------------------------------------------- chat memory
# A kind of fact has its values and one or more wordings. A wording is how the user states it (state), the same
# kind of fact about {owner} (decoy), the question (ask) and the answer (reply); its question shares words with
# its statement, as a person's question does. Training has four wordings a kind in several sentence shapes
# ("my X is", "I <verb> ...", "the X I <verb> is"), so the model learns to find the statement the question points
# at rather than one fixed question per kind; the evaluation's wordings are none of them.
Wording = namedtuple("Wording", "state decoy ask reply")
Fact = namedtuple("Fact", "wordings values")


def _fact(values, *wordings):
    return Fact([Wording(*w) for w in wordings], values)


MEMORY = {
    "train": {
        "facts": {
            "colour": _fact(
                ["red", "blue", "green", "yellow", "purple", "orange", "teal", "pink", "black", "white"],
                ("my favourite colour is {v}", "{owner} favourite colour is {v}", "What was my favourite colour?",
                 "Your favourite colour is {v}."),
                ("the colour I wear most often is {v}", "{owner} usual colour is {v}",
                 "Which colour do I wear most often?", "You wear {v} most often."),
                ("I painted my bedroom {v}", "{owner} bedroom is painted {v}", "What colour did I paint my bedroom?",
                 "You painted your bedroom {v}."),
                ("my umbrella is {v}", "{owner} umbrella is {v}", "What colour is my umbrella?",
                 "Your umbrella is {v}.")),
            "pet": _fact(
                ["Rex", "Biscuit", "Luna", "Pepper", "Milo", "Daisy", "Otto", "Ziggy", "Nala", "Bruno"],
                ("my dog's name is {v}", "{owner} dog's name is {v}", "What is my dog called?",
                 "Your dog is called {v}."),
                ("I named my puppy {v}", "{owner} puppy is named {v}", "What did I name my puppy?",
                 "You named your puppy {v}."),
                ("my parrot answers to {v}", "{owner} parrot answers to {v}", "What does my parrot answer to?",
                 "Your parrot answers to {v}."),
                ("the hamster we keep is {v}", "{owner} hamster is {v}", "Which hamster do we keep?",
                 "You keep a hamster called {v}.")),
            "city": _fact(
                ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Dublin", "Quito", "Perth", "Denver", "Madrid"],
                ("I was born in {v}", "{owner} home town is {v}", "Which city was I born in?",
                 "You were born in {v}."),
                ("I moved to {v} last year", "{owner} new home is in {v}", "Which city did I move to last year?",
                 "You moved to {v} last year."),
                ("my office is in {v}", "{owner} office is in {v}", "In which city is my office?",
                 "Your office is in {v}."),
                ("the city I studied in was {v}", "{owner} university was in {v}", "Which city did I study in?",
                 "You studied in {v}.")),
            "number": _fact(
                ["7", "13", "21", "42", "58", "64", "77", "88", "93", "101", "5", "9", "14", "23", "31", "38", "47",
                 "56", "61", "73", "79", "86", "90", "99", "250", "365", "512", "777"],
                ("my lucky number is {v}", "{owner} lucky number is {v}", "What is my lucky number?",
                 "Your lucky number is {v}."),
                ("my apartment number is {v}", "{owner} apartment number is {v}", "What is my apartment number?",
                 "Your apartment number is {v}."),
                ("I wear number {v} on my team shirt", "{owner} shirt number is {v}",
                 "Which number is on my team shirt?", "Your team shirt has number {v}."),
                ("the locker I use is number {v}", "{owner} locker is number {v}", "Which locker do I use?",
                 "You use locker number {v}.")),
            "food": _fact(
                ["pizza", "sushi", "tacos", "curry", "pasta", "ramen", "falafel", "paella", "dumplings", "pancakes"],
                ("my favourite food is {v}", "{owner} favourite food is {v}", "What's my favourite food?",
                 "Your favourite food is {v}."),
                ("I could eat {v} every day", "{owner} everyday meal is {v}", "What could I eat every day?",
                 "You could eat {v} every day."),
                ("my birthday dinner is always {v}", "{owner} birthday dinner is {v}",
                 "What is my birthday dinner?", "Your birthday dinner is always {v}."),
                ("the meal I cook best is {v}", "{owner} best meal is {v}", "Which meal do I cook best?",
                 "You cook {v} best.")),
            "car": _fact(
                ["Volvo", "Honda", "Ford", "Fiat", "Subaru", "Mazda", "Kia", "Jeep", "Audi", "Tesla"],
                ("I drive a {v}", "{owner} car is a {v}", "What car do I drive?", "You drive a {v}."),
                ("my first car was a {v}", "{owner} first car was a {v}", "What was my first car?",
                 "Your first car was a {v}."),
                ("I just bought a {v}", "{owner} new car is a {v}", "Which car did I just buy?",
                 "You just bought a {v}."),
                ("the car I rent on trips is a {v}", "{owner} rental is a {v}", "Which car do I rent on trips?",
                 "You rent a {v} on trips.")),
            "sport": _fact(
                ["tennis", "soccer", "rugby", "cricket", "hockey", "golf", "boxing", "rowing", "fencing", "skiing"],
                ("my favourite sport is {v}", "{owner} favourite sport is {v}", "What is my favourite sport?",
                 "Your favourite sport is {v}."),
                ("I coach {v} on weekends", "{owner} weekend sport is {v}", "Which sport do I coach on weekends?",
                 "You coach {v} on weekends."),
                ("I watch {v} every Sunday", "{owner} Sunday sport is {v}", "What do I watch every Sunday?",
                 "You watch {v} every Sunday."),
                ("the sport I played at school was {v}", "{owner} school sport was {v}",
                 "Which sport did I play at school?", "You played {v} at school.")),
            "instrument": _fact(
                ["piano", "violin", "cello", "flute", "drums", "ukulele", "trumpet", "harp", "oboe", "banjo"],
                ("I play the {v}", "{owner} instrument is the {v}", "Which instrument do I play?",
                 "You play the {v}."),
                ("I'm learning the {v}", "{owner} lessons are for the {v}", "Which instrument am I learning?",
                 "You are learning the {v}."),
                ("my grandfather gave me a {v}", "{owner} gift was a {v}", "What did my grandfather give me?",
                 "Your grandfather gave you a {v}."),
                ("the instrument I practise daily is the {v}", "{owner} daily instrument is the {v}",
                 "Which instrument do I practise daily?", "You practise the {v} daily.")),
            "job": _fact(
                ["nurse", "baker", "pilot", "plumber", "lawyer", "teacher", "chef", "farmer", "dentist", "painter"],
                ("I work as a {v}", "{owner} job is {v}", "What is my job?", "You work as a {v}."),
                ("I trained as a {v}", "{owner} training was as a {v}", "What did I train as?",
                 "You trained as a {v}."),
                ("my first job was as a {v}", "{owner} first job was as a {v}", "What was my first job?",
                 "Your first job was as a {v}."),
                ("the job I dream of is {v}", "{owner} dream job is {v}", "Which job do I dream of?",
                 "You dream of working as a {v}.")),
            "drink": _fact(
                ["coffee", "tea", "lemonade", "cocoa", "milk", "cider", "juice", "soda", "espresso", "kombucha"],
                ("my favourite drink is {v}", "{owner} favourite drink is {v}", "What's my favourite drink?",
                 "Your favourite drink is {v}."),
                ("I order {v} at every cafe", "{owner} usual order is {v}", "What do I order at every cafe?",
                 "You order {v} at every cafe."),
                ("my morning drink is {v}", "{owner} morning drink is {v}", "What is my morning drink?",
                 "Your morning drink is {v}."),
                ("the drink I make best is {v}", "{owner} best drink is {v}", "Which drink do I make best?",
                 "You make {v} best.")),
            "street": _fact(
                ["Elm", "Oak", "Pine", "Birch", "Main", "High", "Mill", "Church", "Park", "Bridge"],
                ("I live on {v} Street", "{owner} house is on {v} Street", "Which street do I live on?",
                 "You live on {v} Street."),
                ("my school was on {v} Street", "{owner} school was on {v} Street", "Which street was my school on?",
                 "Your school was on {v} Street."),
                ("I leave my bike on {v} Street", "{owner} bike stays on {v} Street",
                 "Which street do I leave my bike on?", "You leave your bike on {v} Street."),
                ("the bakery I go to is on {v} Street", "{owner} bakery is on {v} Street",
                 "Which street is the bakery I go to on?", "The bakery you go to is on {v} Street.")),
            "sibling": _fact(
                ["Tobias", "Samir", "Benedikt", "Maxim", "Leopold", "Jacques", "Noam", "Lior", "Owain", "Elias"],
                ("my brother is called {v}", "{owner} brother is called {v}", "What is my brother's name?",
                 "Your brother is called {v}."),
                ("my best friend is called {v}", "{owner} best friend is called {v}",
                 "What is my best friend's name?", "Your best friend is called {v}."),
                ("I share a flat with {v}", "{owner} flatmate is {v}", "Who do I share a flat with?",
                 "You share a flat with {v}."),
                ("my son is named {v}", "{owner} son is named {v}", "What is my son's name?",
                 "Your son is named {v}.")),
        },
        "owners": ["my sister's", "my friend's", "my boss's", "my neighbour's"],
        "lead_ins": ["By the way, {s}.", "Remember this: {s}.", "Something about me: {s}.", "FYI, {s}."],
        "decoy_lead_ins": ["Also, {s}.", "And {s}.", "Plus, {s}."],
    },
    "eval": {
        "facts": {
            "colour": _fact(["indigo", "crimson", "magenta", "turquoise", "lavender", "scarlet", "silver", "bronze",
                             "ochre", "emerald"],
                            ("the shade I like best is {v}", "{owner} preferred shade is {v}",
                             "Which shade do I like best?", "The shade you like best is {v}.")),
            "pet": _fact(["Whiskers", "Mochi", "Jasper", "Clover", "Pixel", "Saffron", "Tofu", "Nugget", "Sprout",
                          "Gizmo"],
                         ("my cat is called {v}", "{owner} cat is called {v}", "What's the name of my cat?",
                          "Your cat is called {v}.")),
            "city": _fact(["Kyoto", "Lisbon", "Nairobi", "Hanoi", "Bergen", "Cusco", "Tbilisi", "Adelaide", "Montreal",
                           "Seville"],
                          ("I grew up in {v}", "{owner} family comes from {v}", "Where did I grow up?",
                           "You grew up in {v}.")),
            "number": _fact(["3", "11", "17", "29", "36", "45", "52", "69", "84", "97"],
                            ("the number I always bet on is {v}", "{owner} betting number is {v}",
                             "Which number do I always bet on?", "You always bet on {v}.")),
            "food": _fact(["lasagna", "risotto", "burritos", "kimchi", "gnocchi", "biryani", "waffles", "goulash",
                           "ceviche", "pierogi"],
                          ("the dish I love most is {v}", "{owner} go-to dish is {v}", "Which dish do I love most?",
                           "The dish you love most is {v}.")),
        },
        "owners": ["my cousin's", "my uncle's", "my coworker's", "my roommate's"],
        "lead_ins": ["Oh, before I forget: {s}."],
        "decoy_lead_ins": ["One more thing, {s}."],
    },
}

# Half of the training facts take open values instead of their kind's list: made-up words (numbers: any of
# 1-999), new in nearly every example. With ten values a kind the GPT learned each kind's list and answered a
# question in new wording with a value from it ("You were born in Oslo."); a value it has never seen can only be
# copied from where the user said it, which is what the evaluation's unseen values need.
OPEN_VALUE_SHARE = 0.5
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@functools.cache
def _eval_names():
    return frozenset(v.lower() for v in inventory("eval")["names"])


def open_values(kind, seed, n):
    """n distinct made-up values for a training fact of this kind (a pure function of seed): numbers for
    "number", else words of 2-3 syllables, capitalised where the kind's own values are. None is a name or value
    of the evaluation half."""
    r = random.Random(seed)
    held = _eval_names()
    capital = MEMORY["train"]["facts"][kind].values[0][:1].isupper()
    out = []
    while len(out) < n:
        if kind == "number":
            v = str(r.randint(1, 999))
        else:
            v = "".join(r.choice(_SYLLABLES) for _ in range(r.randint(2, 3)))
            v = v.capitalize() if capital else v
        if v.lower() not in held and v not in out:
            out.append(v)
    return out


# --------------------------------------------------------------------------- chat filler
CHAT = {
    "train": {
        "acks": ["Got it, I'll remember that.", "Noted!", "Thanks for telling me.", "Okay, I'll keep that in mind."],
        "small_talk": [
            ("How's the weather where you are?", "I don't experience weather, but I hope it's nice where you are!"),
            ("Any tips for sleeping better?",
             "Keep a regular schedule, avoid screens before bed, and keep the room cool and dark."),
            ("Tell me a fun fact.", "Octopuses have three hearts and blue blood."),
            ("What should I cook tonight?", "How about a simple stir-fry with vegetables and rice?"),
            ("I'm a bit bored.", "Maybe try a short walk, a new book, or a puzzle?"),
            ("Recommend a hobby.", "Drawing is a great hobby: cheap to start and relaxing."),
            ("What's a good name for a plant?", "How about Fernando the fern?"),
            ("Is it better to run in the morning or evening?",
             "Either works; the best time is the one you can stick to."),
            ("How do I stay focused?", "Work in short blocks with breaks, and put your phone in another room."),
            ("Say something encouraging.", "You're doing better than you think. Keep going!"),
        ],
        "sum": ("Quick one: what is {a} {op} {b}?", "{a} {op} {b} = {c}"),
        "paste_intros": ["Here is a chapter I'm reading:", "Can you read this passage for me?",
                         "This is from the book on my desk:"],
        "paste_replies": ["Thanks for sharing the passage.", "That's an interesting read.", "I've read it through."],
    },
    "eval": {
        "acks": ["Understood.", "All right, noted down.", "Sure, I've got that.", "Okay, thanks for letting me know."],
        "small_talk": [
            ("What's a good way to start the morning?", "A glass of water, some stretching and a plan for the day."),
            ("Can you suggest a board game for four people?",
             "Try Carcassonne: easy to learn and fun with a group."),
            ("How do I keep my houseplants alive?",
             "Water them when the soil is dry and give them bright, indirect light."),
            ("Tell me something about owls.", "Owls can turn their heads about 270 degrees."),
            ("What's a quick lunch idea?", "A wrap with hummus, lettuce and whatever vegetables you have."),
            ("I can't decide what to watch tonight.", "Pick something short, like a documentary under an hour."),
            ("Any advice for learning a language?",
             "A little every day beats a lot once a week; talk to people early."),
            ("What's a nice way to relax after work?",
             "A short walk, some music, or a warm shower can help you unwind."),
            ("Give me a riddle.", "What gets wetter the more it dries? A towel."),
            ("How long should a nap be?", "About twenty minutes keeps you from waking up groggy."),
            ("What's a fun weekend project?",
             "Build a bird feeder: it takes an afternoon and the birds will thank you."),
            ("Do you have a tip for writing emails?", "Put the request in the first line and keep it short."),
        ],
        "sum": ("Can you work out {a} {op} {b} for me?", "That comes to {c}."),
        "paste_intros": ["Here's an excerpt I came across:", "Have a look at this text:",
                         "I'm going through this document right now:"],
        "paste_replies": ["Thanks, that was a nice excerpt.", "Interesting text, thank you.",
                          "Done, I went through all of it."],
    },
}

# --------------------------------------------------------------------------- bAbI-style stories (tasks/babi.py)
# facts: per kind, the sentences that state it ({a} the actor, {p} a place, {o} an object, {b} the receiver);
# questions: per task, (raw: the text after the history, ending where the one-word answer starts; chat: the
# user's last turn); replies: per task, the reference chat reply; lead_ins: how the user states a fact in chat.
# Every place, actor and object is one word that no other name or template of either half contains.
BABI = {
    "train": {
        "actors": ["Mary", "John", "Daniel", "Sandra", "Fred", "Julie", "Bill", "Emma"],
        "places": ["kitchen", "bathroom", "hallway", "garden", "office", "bedroom"],
        "objects": ["football", "apple", "milk", "umbrella", "backpack"],
        "facts": {
            "move": ["{a} went to the {p}.", "{a} journeyed to the {p}."],
            "get": ["{a} picked up the {o}.", "{a} got the {o}."],
            "drop": ["{a} dropped the {o}.", "{a} put down the {o}."],
            "give": ["{a} gave the {o} to {b}.", "{a} handed the {o} to {b}."],
        },
        "questions": {
            "qa1": [("\nQuestion: Where is {a}?\nAnswer:", "Where is {a}?"),
                    ("\nWhere is {a} now? Answer in one word:", "Where is {a} now?")],
            "qa2": [("\nQuestion: Where is the {o}?\nAnswer:", "Where is the {o}?"),
                    ("\nWhere is the {o} now? Answer in one word:", "Where is the {o} now?")],
            "qa3": [("\nQuestion: Where was the {o} before the {p}?\nAnswer:", "Where was the {o} before the {p}?"),
                    ("\nBefore the {p}, where was the {o}? Answer in one word:", "Before the {p}, where was the {o}?")],
        },
        "replies": {"qa1": "{a} is in the {p}.", "qa2": "The {o} is in the {p}.", "qa3": "The {o} was in the {p}."},
        "lead_ins": ["By the way, {s}", "Oh, and {s}", "Quick update: {s}"],
    },
    "eval": {
        "actors": ["Oliver", "Priya", "Hector", "Yuki", "Greta", "Tomas", "Leila", "Omar"],
        "places": ["library", "attic", "garage", "cellar", "balcony", "pantry"],
        "objects": ["guitar", "kettle", "wallet", "scarf", "camera"],
        "facts": {
            "move": ["{a} travelled to the {p}.", "{a} moved to the {p}."],
            "get": ["{a} grabbed the {o}.", "{a} took the {o}."],
            "drop": ["{a} discarded the {o}.", "{a} set the {o} down."],
            "give": ["{a} passed the {o} to {b}.", "{b} received the {o} from {a}."],
        },
        "questions": {
            "qa1": [("\nQuestion: In which place is {a} at the end?\nAnswer:", "In which place is {a} at the end?"),
                    ("\nTell me where {a} can be found. Answer in one word:", "Tell me where {a} can be found.")],
            "qa2": [("\nQuestion: In which place is the {o} at the end?\nAnswer:",
                     "In which place is the {o} at the end?"),
                    ("\nTell me where the {o} can be found. Answer in one word:",
                     "Tell me where the {o} can be found.")],
            "qa3": [("\nQuestion: Which place did the {o} come from before reaching the {p}?\nAnswer:",
                     "Which place did the {o} come from before reaching the {p}?"),
                    ("\nWhere had the {o} been just prior to the {p}? Answer in one word:",
                     "Where had the {o} been just prior to the {p}?")],
        },
        "replies": {"qa1": "{a} is currently in the {p}.", "qa2": "The {o} is currently in the {p}.",
                    "qa3": "It had been in the {p}."},
        "lead_ins": ["For the record, {s}", "Just so you know, {s}", "News from the story: {s}"],
    },
}


def inventory(split):
    """Everything of one half that a model could memorise, by kind: {"templates": set, "names": set}.
    Templates keep their placeholders; the answer formats shared on purpose (module docstring) are left out."""
    check_split(split)
    p, m, k, mem, chat = PASSKEY[split], MULTIKEY[split], KV[split], MEMORY[split], CHAT[split]
    templates = set(p["needles"]) | set(m["needles"]) | set(m["decoys"]) | set(k["needles"])
    for qs in (p["questions"], m["questions"], k["questions"]):
        templates |= {t for pair in qs for t in pair}
    templates |= {t for f in mem["facts"].values() for w in f.wordings for t in w}
    templates |= {*mem["lead_ins"], *mem["decoy_lead_ins"], *chat["acks"], *chat["sum"], *chat["paste_intros"],
                  *chat["paste_replies"]}
    templates |= {t for pair in chat["small_talk"] for t in pair}
    b = BABI[split]
    templates |= {t for ts in b["facts"].values() for t in ts} | {*b["replies"].values(), *b["lead_ins"]}
    templates |= {t for qs in b["questions"].values() for pair in qs for t in pair}
    names = set(m["labels"]) | set(k["labels"]) | {o.split()[-1] for o in mem["owners"]}
    names |= {v for f in mem["facts"].values() for v in f.values}
    names |= set(b["actors"]) | set(b["places"]) | set(b["objects"])
    return {"templates": templates, "names": names}
