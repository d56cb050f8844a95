"""Moat: a VPN appliance and services platform."""

__version__ = "0.1.0"
