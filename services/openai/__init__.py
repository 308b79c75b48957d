"""The OpenAI-compatible HTTP front door: /v1/chat/completions, /v1/completions and /v1/models, served by
a client of the router's public meshserve.v1.GenerationService (docs in README.md, "OpenAI-compatible API")."""
