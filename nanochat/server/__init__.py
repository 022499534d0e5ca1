"""
The serving layer: an OpenAI-compatible chat API over the model, a persistent MegaContext memory per
conversation, document upload into a memory, and the page that shows the memory (nanochat/ui.html).
`scripts/chat_web.py` is its command line; `create_app` (app.py) builds the FastAPI app, so tests
serve tiny models in-process or under a real uvicorn.

    app.py            create_app: the page, /health, /v1/models, error handling, middleware
    completions.py    POST /v1/chat/completions in OpenAI's shapes
    memory_routes.py  conversations, document upload, the focus map and its event stream
    state.py          what the routes share (Server), reading JSON, writing server-sent events
    validation.py     what a request may ask for (Limits, Defaults) and how a body is checked
    errors.py         OpenAI's error object, one exception for every 4xx/5xx the API gives
    security.py       API key, allowed origins and hosts, request size (ASGI middleware)
    scheduler.py      many conversations at once: a fair model lock taken per step, a concurrency limit
    conversations.py  the memories on disk: one record and one turn lock per conversation
    turns.py          one chat turn and one document ingest, as events (tokens, usage, progress)
    focus_map.py      what the page draws: the working context's entries with their spans and levels
"""
