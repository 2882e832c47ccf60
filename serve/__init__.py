"""The HTTP layer (the `serve` extra): an OpenAI-compatible app over the runtime's engine, apart from it so that the
runtime ships without FastAPI."""
