"""Shared test and benchmark support: doubles, fixtures and harnesses used across test folders."""
