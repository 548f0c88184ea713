"""Runnable examples for Countersign (see examples/procurement/)."""
