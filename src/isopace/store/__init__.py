"""isopace.store."""
