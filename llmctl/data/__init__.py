"""Data files shipped with llmctl (the catalog)."""
