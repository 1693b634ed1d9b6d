"""The HTTP side of vlcache: the caching reverse proxy, its CLI and its demo."""
