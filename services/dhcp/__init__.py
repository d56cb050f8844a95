"""DHCPv4 for the moat: a server for the private side, a client for the wild side.

Layout (sans-IO cores, thin adapters):

    message.py   wire codec of RFC 2131 messages and RFC 2132 options
    lease.py     the server's lease database, written durably before each ACK
    config.py    the server's TOML configuration
    server.py    server core: message in, reply + destination out
    client.py    client core: INIT .. BOUND .. RENEWING/REBINDING, timers out
    udpip.py     IPv4/UDP framing for the client's packet socket
    dhcpd.py     `moat dhcpd`: UDP socket adapter around the server core
    dhcpc.py     `moat dhcpc`: packet/UDP socket adapter around the client core
"""
