"""tensorq tests: unit (fakeredis / pure) and integration (real redis-server, real processes)."""
