"""DNS for the LAN: secondary for corporate zones, caching forwarder, local names."""
