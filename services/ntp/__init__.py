"""NTP: client of the portal's server and server for the LAN (RFC 5905)."""
