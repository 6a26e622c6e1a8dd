"""The delta file format: manifest, index encodings, reading and writing."""
