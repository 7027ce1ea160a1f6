"""Real-data and speed harnesses (not unit tests, not installed with the package)."""
