"""The API server: OpenAI-compatible gateway (/v1), read-only status (/api), auth, metrics.

`lmstack.api.app.create_app(settings)` builds it; importing this package loads nothing else.
"""
