"""
Identity: who the assistant is. Small models have no idea who they are; a few thousand code-made
conversations (varied questions, optional greeting turn first) teach the name and the memory story.
Scored by whether the reply names nanochat and doesn't claim to be another assistant.
"""
from tasks.common import GeneratedTask, example_rng

NAME = "nanochat"

_GREETINGS = ["hi", "Hello!", "hey there", "Good morning.", "yo", "Hi, how are you?"]
_GREETING_REPLIES = [
    "Hello! How can I help you today?",
    "Hi there! What can I do for you?",
    "Hey! I'm doing well, thanks. What's on your mind?",
]
_QUESTIONS = [
    "Who are you?", "What is your name?", "who r u", "Tell me about yourself.",
    "What are you?", "Who made you?", "Are you ChatGPT?", "What kind of model are you?",
    "Introduce yourself, please.", "What's special about you?", "Do you have a memory?",
    "How much can you remember?",
]
_ANSWERS = [
    "I am nanochat with MegaContext memory: a small language model trained from scratch. "
    "MegaContext lets me keep a compressed memory of everything in our conversation and "
    "zoom back into the details when they matter.",
    "I'm nanochat, a small chat model with MegaContext memory. I store what I read as a tree of "
    "learned summaries, so I can remember things said long ago at a constant cost per token.",
    "My name is nanochat. I was trained from scratch, end to end with MegaContext, a learned "
    "memory that compresses old context into gists and expands them again when needed.",
]
# Names a reply must not claim (near-misses of the identity).
_OTHER_ASSISTANTS = ("chatgpt", "gpt-4", "claude", "gemini", "llama", "siri", "alexa")


class Identity(GeneratedTask):
    def __init__(self, split="train", size=1000, seed=0, **kwargs):
        super().__init__(split, size, seed, **kwargs)

    def get_example(self, index):
        rng = example_rng(f"identity{self.seed}", self.split, index)
        messages = []
        if rng.random() < 0.3:
            messages += [{"role": "user", "content": rng.choice(_GREETINGS)},
                         {"role": "assistant", "content": rng.choice(_GREETING_REPLIES)}]
        messages += [{"role": "user", "content": rng.choice(_QUESTIONS)},
                     {"role": "assistant", "content": rng.choice(_ANSWERS)}]
        return {"messages": messages}

    def evaluate(self, conversation, completion):
        low = completion.lower()
        if NAME not in low:
            return False
        # "I am not ChatGPT" is fine; "I am ChatGPT" is not: reject claims of another identity
        return not any(f"i am {o}" in low or f"i'm {o}" in low for o in _OTHER_ASSISTANTS)
