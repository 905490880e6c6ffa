"""Reproduction and speed suites behind ``milkit benchmark`` (never run as tests)."""
