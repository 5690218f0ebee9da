"""Distilling the pretrained sentence encoder all-MiniLM-L6-v2 into a copy of itself that uses Skyformer attention."""
