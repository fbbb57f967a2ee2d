"""Checkpoint sources: one small reader per format, safe loading and format detection.

`open_source(path)` detects the format (geostore run directory, a directory of state dicts,
an ARENA `full_run_data.pth` bundle, a miscope variant directory) and returns a `RunSource`.
"""
