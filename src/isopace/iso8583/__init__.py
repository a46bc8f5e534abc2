"""isopace.iso8583."""
