"""The search page: a Starlette app beside the Flow (``--web-port``), its static files and browser helpers."""
