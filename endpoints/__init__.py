"""HTTP handlers: each parses, calls one service function, and renders."""
