"""The offline firmware builder: frozen payload, Debian packages, disk image.

It assembles the board defined in board/ from Debian binary packages and the
PyInstaller-frozen `moat` program, without loop mounts or root-only tools.
"""
