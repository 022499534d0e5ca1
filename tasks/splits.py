"""
The two halves of every synthetic long-context task: midtraining draws split="train", the evaluation
split="eval", and the halves share nothing a model could memorise, so the evaluation measures memory that
generalises, not the training templates. Disjoint by construction (tests/test_splits.py checks it):

- needle sentences, decoy sentences and question wordings (raw and chat forms) of passkey, multikey and
  kv_recall (tasks/longctx.py);
- the labels: multikey colours, kv-recall words;
- the chat-memory facts (tasks/memory.py, tasks/longctx.chat_memory): how a fact is stated and asked,
  its values, the decoys' owners; and the training half's open facts (any attribute, a made-up value);
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
# state: how the user says it; decoy: the same kind of fact about {owner}; ask: the question; reply: the answer
Fact = namedtuple("Fact", "state decoy ask reply values")
MEMORY = {
    "train": {
        "facts": {
            "colour": Fact("my favourite colour is {v}", "{owner} favourite colour is {v}",
                           "What was my favourite colour?", "Your favourite colour is {v}.",
                           ["red", "blue", "green", "yellow", "purple", "orange", "teal", "pink", "black", "white"]),
            "pet": Fact("my dog's name is {v}", "{owner} dog's name is {v}", "What is my dog called?",
                        "Your dog is called {v}.",
                        ["Rex", "Biscuit", "Luna", "Pepper", "Milo", "Daisy", "Otto", "Ziggy", "Nala", "Bruno"]),
            "city": Fact("I was born in {v}", "{owner} home town is {v}", "Which city was I born in?",
                         "You were born in {v}.",
                         ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Dublin", "Quito", "Perth", "Denver", "Madrid"]),
            "number": Fact("my lucky number is {v}", "{owner} lucky number is {v}", "What is my lucky number?",
                           "Your lucky number is {v}.",
                           ["7", "13", "21", "42", "58", "64", "77", "88", "93", "101", "5", "9", "14", "23", "31",
                            "38", "47", "56", "61", "73", "79", "86", "90", "99", "250", "365", "512", "777"]),
            "food": Fact("my favourite food is {v}", "{owner} favourite food is {v}", "What's my favourite food?",
                         "Your favourite food is {v}.",
                         ["pizza", "sushi", "tacos", "curry", "pasta", "ramen", "falafel", "paella", "dumplings",
                          "pancakes"]),
            # more kinds than the evaluation asks about, so that a model learns to copy what was stated
            # rather than to pick among a few memorised values
            "car": Fact("I drive a {v}", "{owner} car is a {v}", "What car do I drive?", "You drive a {v}.",
                        ["Volvo", "Honda", "Ford", "Fiat", "Subaru", "Mazda", "Kia", "Jeep", "Audi", "Tesla"]),
            "sport": Fact("my favourite sport is {v}", "{owner} favourite sport is {v}", "What is my favourite sport?",
                          "Your favourite sport is {v}.",
                          ["tennis", "soccer", "rugby", "cricket", "hockey", "golf", "boxing", "rowing", "fencing",
                           "skiing"]),
            "instrument": Fact("I play the {v}", "{owner} instrument is the {v}", "Which instrument do I play?",
                               "You play the {v}.",
                               ["piano", "violin", "cello", "flute", "drums", "ukulele", "trumpet", "harp", "oboe",
                                "banjo"]),
            "job": Fact("I work as a {v}", "{owner} job is {v}", "What is my job?", "You work as a {v}.",
                        ["nurse", "baker", "pilot", "plumber", "lawyer", "teacher", "chef", "farmer", "dentist",
                         "painter"]),
            "drink": Fact("my favourite drink is {v}", "{owner} favourite drink is {v}", "What's my favourite drink?",
                          "Your favourite drink is {v}.",
                          ["coffee", "tea", "lemonade", "cocoa", "milk", "cider", "juice", "soda", "espresso",
                           "kombucha"]),
            "street": Fact("I live on {v} Street", "{owner} house is on {v} Street", "Which street do I live on?",
                           "You live on {v} Street.",
                           ["Elm", "Oak", "Pine", "Birch", "Main", "High", "Mill", "Church", "Park", "Bridge"]),
            "sibling": Fact("my brother is called {v}", "{owner} brother is called {v}", "What is my brother's name?",
                            "Your brother is called {v}.",
                            ["Tobias", "Samir", "Benedikt", "Maxim", "Leopold", "Jacques", "Noam", "Lior", "Owain",
                             "Elias"]),
        },
        "owners": ["my sister's", "my friend's", "my boss's", "my neighbour's"],
        "lead_in": "By the way, {s}.",       # the asked fact
        "decoy_lead_in": "Also, {s}.",       # a decoy
    },
    "eval": {
        "facts": {
            "colour": Fact("the shade I like best is {v}", "{owner} preferred shade is {v}",
                           "Which shade do I like best?", "The shade you like best is {v}.",
                           ["indigo", "crimson", "magenta", "turquoise", "lavender", "scarlet", "silver", "bronze",
                            "ochre", "emerald"]),
            "pet": Fact("my cat is called {v}", "{owner} cat is called {v}", "What's the name of my cat?",
                        "Your cat is called {v}.",
                        ["Whiskers", "Mochi", "Jasper", "Clover", "Pixel", "Saffron", "Tofu", "Nugget", "Sprout",
                         "Gizmo"]),
            "city": Fact("I grew up in {v}", "{owner} family comes from {v}", "Where did I grow up?",
                         "You grew up in {v}.",
                         ["Kyoto", "Lisbon", "Nairobi", "Hanoi", "Bergen", "Cusco", "Tbilisi", "Adelaide", "Montreal",
                          "Seville"]),
            "number": Fact("the number I always bet on is {v}", "{owner} betting number is {v}",
                           "Which number do I always bet on?", "You always bet on {v}.",
                           ["3", "11", "17", "29", "36", "45", "52", "69", "84", "97"]),
            "food": Fact("the dish I love most is {v}", "{owner} go-to dish is {v}", "Which dish do I love most?",
                         "The dish you love most is {v}.",
                         ["lasagna", "risotto", "burritos", "kimchi", "gnocchi", "biryani", "waffles", "goulash",
                          "ceviche", "pierogi"]),
        },
        "owners": ["my cousin's", "my uncle's", "my coworker's", "my roommate's"],
        "lead_in": "Oh, before I forget: {s}.",
        "decoy_lead_in": "One more thing, {s}.",
    },
}

# Open facts (training half only): any attribute, stated in one of several shapes, with a made-up value
# (tasks/longctx.open_fact). With twelve fixed kinds of fact a small GPT learns twelve question -> statement
# pairings and answers a question it never heard with small talk; with ~80 attributes and values it
# cannot have seen, the only thing that pays is finding the statement the question points at and copying the
# value from it. The reply echoes the attribute, so that the copy is a lookup of what followed it.
MEMORY_OPEN = {
    "attributes": [
        "bike", "boat", "hamster", "parrot", "goldfish", "tortoise", "horse", "rabbit", "lizard", "canary",
        "middle name", "nickname", "locker code", "wifi password", "code word", "secret word", "username",
        "favourite tree", "favourite flower", "favourite season", "favourite planet", "favourite bird",
        "favourite fruit", "favourite snack", "favourite game", "favourite band", "favourite author",
        "favourite movie", "favourite song", "favourite word", "favourite holiday", "favourite cheese",
        "favourite soup", "favourite pastry", "favourite museum", "favourite river", "favourite mountain",
        "favourite island", "favourite painter", "favourite poet", "favourite shop", "favourite park",
        "favourite font", "favourite candle", "favourite spice", "favourite bread", "favourite berry",
        "first teacher", "first phone", "best friend", "doctor", "landlord", "gym", "bakery", "hotel",
        "school", "village", "robot", "cactus", "laptop", "router", "team", "club", "podcast",
        "choir", "ship", "tent", "kayak", "drone", "blog", "puppet", "snowman", "scooter", "violin teacher",
        "chess opening", "yoga class", "bank", "barber", "tailor", "lucky charm", "alarm tune", "ringtone",
    ],
    "states": ["my {a} is {v}", "my {a} is named {v}", "I call my {a} {v}", "the {a} I have is {v}",
               "I named my {a} {v}", "my {a} goes by {v}", "our {a} is {v}"],
    "decoys": ["{owner} {a} is {v}", "{owner} {a} is named {v}", "{owner} {a} goes by {v}"],
    "asks": ["What is my {a}?", "Do you remember my {a}?", "Remind me, what is my {a}?", "What did I say my {a} is?",
             "Tell me my {a} again.", "Can you recall my {a}?", "And my {a}?"],
    "reply": "Your {a} is {v}.",
    # the same attributes with a verb: "the bike I use most is Zanfar" / "Which bike do I use most?"
    "verbs": ["prefer", "use most", "visit most", "trust", "recommend", "enjoy most", "rely on", "keep"],
    "verb_states": ["the {a} I {verb} is {v}", "the {a} that I {verb} is {v}"],
    "verb_asks": ["Which {a} do I {verb}?", "What {a} do I {verb}?", "Tell me which {a} I {verb}."],
    "verb_reply": "The {a} you {verb} is {v}.",
    # events with a place: (statement, decoy, question, reply)
    "events": [("I studied in {v}", "{owner} college was in {v}", "Where did I study?", "You studied in {v}."),
               ("I got married in {v}", "{owner} wedding was in {v}", "Where did I get married?",
                "You got married in {v}."),
               ("I spent last summer in {v}", "{owner} summer was spent in {v}", "Where did I spend last summer?",
                "You spent last summer in {v}."),
               ("I learned to swim in {v}", "{owner} swimming lessons were in {v}", "Where did I learn to swim?",
                "You learned to swim in {v}."),
               ("I met my partner in {v}", "{owner} partner lives in {v}", "Where did I meet my partner?",
                "You met your partner in {v}.")],
    "lead_ins": ["By the way, {s}.", "FYI, {s}.", "Remember this: {s}.", "Something about me: {s}."],
    # made-up values: 2-3 syllables of these (capitalised half the time), or a number 100-999
    "onsets": ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gr", "tr", "pl"],
    "vowels": ["a", "e", "i", "o", "u"],
    "codas": ["", "", "", "n", "r", "l", "s"],
}

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
    for f in mem["facts"].values():
        templates |= {f.state, f.decoy, f.ask, f.reply}
    if split == "train":  # the open facts as a model reads them: every shape with every attribute
        o = MEMORY_OPEN
        shapes = (*o["states"], *o["decoys"], *o["asks"], o["reply"], *o["verb_states"], *o["verb_asks"],
                  o["verb_reply"])  # ({verb} stays a placeholder: any verb)
        templates |= {t.replace("{a}", a) for t in shapes for a in o["attributes"]} | set(o["lead_ins"])
        templates |= {t for event in o["events"] for t in event}
    templates |= {mem["lead_in"], mem["decoy_lead_in"], *chat["acks"], *chat["sum"], *chat["paste_intros"],
                  *chat["paste_replies"]}
    templates |= {t for pair in chat["small_talk"] for t in pair}
    b = BABI[split]
    templates |= {t for ts in b["facts"].values() for t in ts} | {*b["replies"].values(), *b["lead_ins"]}
    templates |= {t for qs in b["questions"].values() for pair in qs for t in pair}
    names = set(m["labels"]) | set(k["labels"]) | {o.split()[-1] for o in mem["owners"]}
    names |= {v for f in mem["facts"].values() for v in f.values}
    names |= set(b["actors"]) | set(b["places"]) | set(b["objects"])
    if split == "train":
        names |= set(MEMORY_OPEN["attributes"])
    return {"templates": templates, "names": names}
