"""isopace.flow."""
