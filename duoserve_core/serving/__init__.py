"""The pieces of ``duoserve_core.server`` (the OpenAI-compatible HTTP server), kept small and separate.

- ``engine``: the one thread that owns the continuous batcher, fed through an inbox;
- ``generation``: one HTTP request's choices on the event loop, as text events; cancelled when the client leaves;
- ``text``: incremental detokenization with stop strings, for streamed and whole responses alike;
- ``protocol``: the request bodies (pydantic) and OpenAI-shaped errors.
"""
