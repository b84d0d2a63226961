"""`qtool serve`: an OpenAI-compatible HTTP server over the engine (runtime/engine) and the studio page.

Sits above the jobs (beside convert/): it imports runtime/ and below, and only cli/ imports it."""
