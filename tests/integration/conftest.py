"""tests/integration: single components (the engine, the tokenizer core, backends, Envoy's config) over
the real prepared model or a real binary (Envoy's validator, buf), without starting the mesh."""
