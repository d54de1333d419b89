"""Test kit shared by the tests and bench/: tiny models, a running service, a headless browser."""
