"""Thin napari dock widgets: they gather inputs, call the core, and show results."""
