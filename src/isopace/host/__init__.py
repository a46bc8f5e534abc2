"""isopace.host."""
