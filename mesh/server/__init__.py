"""The aiohttp edge: handlers are thin and read typed app state (`request.app[KEY]`).

- `appkeys`         — every `web.AppKey` of the app, in one place.
- `middleware`      — the error envelope (one middleware), `bearer_check` (the one key comparison).
- `openai_wire`     — OpenAI request parsing and response/chunk builders (the only OpenAI-shaped code).
- `openai_routes`   — `/v1/models`, `/healthz`, `/metrics`, and registration of the inference routes.
- `inference`       — the chat/completion request path: route, cold-load, stream, forward, log, metrics.
- `operator_routes` — `/mesh/state`, `/mesh/events`, `/mesh/models/*`, `/mesh/catalogue`.
- `peer_routes`     — `/mesh/peer/*`: gossip, forwarded inference, load/unload on this node.
"""
