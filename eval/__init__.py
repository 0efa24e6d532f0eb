"""Benchmark readers and metrics (Flickr30k / COCO retrieval, SugarCrepe, QA)."""
