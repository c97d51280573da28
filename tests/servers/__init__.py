"""Real servers the tests start and stop themselves, on loopback."""
