"""Support code for the container tests (tests/test_container_run.py): the engine, base-image
stand-ins, the pip secret and compose projects."""
