"""Small helpers the library and the plugin share: atomic files, JSON files, locks, paths, limits, text."""
