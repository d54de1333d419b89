"""The search page: a Starlette app beside the Flow (``--web-port``) and its static files."""
