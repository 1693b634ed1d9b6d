"""Image vectors and question keys: plain, synchronous computation (no asyncio, no I/O)."""
