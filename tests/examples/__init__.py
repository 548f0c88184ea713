"""Tests of the runnable examples (examples/)."""
