"""ESP datapath: tunnel-mode ESP over UDP/4500 or IP protocol 50, from TUN."""
