"""LAN services of the moat: DHCP, DNS, NTP, and wild-side lockdown."""
