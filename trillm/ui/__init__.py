"""User interfaces against a running server."""
