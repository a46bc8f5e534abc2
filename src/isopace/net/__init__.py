"""isopace.net."""
