"""Readers and writers of other projects' file formats (each in its own module)."""
