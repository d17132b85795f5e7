"""Backbones as data: the registry of rows and family rules, the layer facts derived from each
built model, and the adapter that builds, preprocesses and loads weights."""
