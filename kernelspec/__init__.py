"""Kernelspec assets (logos) for SmolVM Python; kernel.json is written by install."""
