"""The Sandbox API and one running VM: start, pause, snapshot, messages."""
