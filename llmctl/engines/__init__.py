"""Engines run models. Each module imports its library only when it is used."""
