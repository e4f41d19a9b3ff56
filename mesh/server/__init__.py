"""The aiohttp edge: handlers are thin and read typed app state (`request.app[KEY]`).

- `appkeys`         — every `web.AppKey` of the app, in one place.
- `middleware`      — the error envelope (one middleware), `bearer_check` (the one key comparison).
- `openai_wire`     — OpenAI request parsing and response/chunk builders (the only OpenAI-shaped code).
- `openai_routes`   — `/v1/models`, `/healthz`, `/metrics`, and registration of the inference routes.
- `inference`       — the chat/completion request path: route, cold-load, stream, forward, log, metrics.
- `operator_routes` — `/mesh/state`, `/mesh/events`, `/mesh/models/*`, `/mesh/catalogue`.
- `peer_routes`     — `/mesh/peer/*`: gossip, forwarded inference, load/unload on this node.
- `responses_wire`, `responses_routes` — `POST /v1/responses` (OpenAI's Responses API, stateless).
- `anthropic_wire`, `anthropic_routes` — `POST /v1/messages` and `/count_tokens` (Anthropic's Messages API).
- `connections`     — the server under the app: idle, header and body timeouts, a stalled reader's
                      connection closed, the connection limit, unparsable requests in the envelope.
"""
