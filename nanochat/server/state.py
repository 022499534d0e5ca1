"""What every route shares: the Server (the chat, the memories, the scheduler, the limits), and the two
helpers every route needs: reading a JSON body, writing a server-sent event."""
import json
from dataclasses import dataclass

from nanochat.server.errors import APIError


@dataclass
class Server:
    chat: object             # EngineChat, or the template MemoryChat whose nets every conversation uses
    memories: object         # conversations.ConversationMemories, or None without MegaContext weights
    scheduler: object        # scheduler.Scheduler
    hub: object              # focus_map.FocusHub
    limits: object           # validation.Limits
    defaults: object         # validation.Defaults
    model_name: str          # the id /v1/models lists and completions answer as
    source: object = None    # the checkpoint kind, for /health
    doc_chunk_tokens: int = 8192  # tokens a document is read in at a time (one model step each)

    def need_memory(self):
        if self.memories is None:
            raise APIError("this model has no MegaContext memory (its checkpoint was not trained with --mc), "
                           "so it keeps no conversations or documents", 404, code="no_memory")
        return self.memories


def sse(obj):
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj)}\n\n"


async def read_json(request):
    try:
        return json.loads(await request.body())
    except ValueError:
        raise APIError("the request body is not valid JSON") from None
