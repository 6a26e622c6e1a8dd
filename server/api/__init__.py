"""The HTTP edge: OpenAI-compatible routes, the delta admin API, auth, and error translation."""
