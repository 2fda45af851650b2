"""A tiny echo service: the reference worker for tests and the broker benchmark."""
