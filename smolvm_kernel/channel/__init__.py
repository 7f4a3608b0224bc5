"""The host side of the guest channel: framing and transports."""
