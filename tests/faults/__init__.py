"""Fault injection for tests: a fault-injecting S3 proxy (s3_proxy.py) and its own tests."""
