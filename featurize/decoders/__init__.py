"""Decoder backends, one module each, behind the interface in featurize/decoder.py."""
